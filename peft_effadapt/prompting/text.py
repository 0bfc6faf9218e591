"""Token-id construction for CLIP and SigLIP text prompts: placeholder prompts, template prompts and their checks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .family import CLIP_TEXT, TextFamily


def _squash(text: str) -> str:
    """Text as CLIP-style tokenizers reproduce it: lower-case, without whitespace."""
    return "".join(text.lower().split())


def _check_round_trip(tokenizer, text: str, ids: list[int], what: str) -> None:
    """Raises when `ids` do not decode back to `text`: the tokenizer maps (part of) it to an unknown token, or to ids
    that stand for other words, so the prompt would be initialised (or matched) from something else than `text`."""
    unk = getattr(tokenizer, "unk_token_id", None)
    decoded = tokenizer.decode(ids, skip_special_tokens=False)
    if (unk is not None and unk in ids) or _squash(decoded) != _squash(text):
        raise ValueError(
            f"{what} {text!r} does not round-trip through {type(tokenizer).__name__}: it tokenises to {ids}, which "
            f"decode to {decoded!r}{f' (unknown-token id {unk})' if unk is not None and unk in ids else ''}. Choose "
            "words in the tokenizer's vocabulary, or give the token ids yourself."
        )


def context_token_ids(tokenizer, text: str) -> list[int]:
    """Ids of `text` without BOS/EOS (the token count, not the word count, is the context length); raises when they
    do not decode back to `text`."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise ValueError(f"ctx_init {text!r} tokenises to no tokens.")
    _check_round_trip(tokenizer, text, ids, "ctx_init")
    return ids


def single_token_id(tokenizer, token: str) -> int:
    ids = list(tokenizer(token, add_special_tokens=False)["input_ids"])
    if len(ids) != 1:
        raise ValueError(
            f"placeholder_token {token!r} is {len(ids)} tokens ({ids}) for this tokenizer; choose a text that is "
            "exactly one token (e.g. 'X'), or set placeholder_token_id."
        )
    _check_round_trip(tokenizer, token, ids, "placeholder_token")
    return int(ids[0])


def special_ids(tokenizer, family: TextFamily = CLIP_TEXT) -> tuple[int | None, int, int]:
    """(BOS, EOS, PAD) of a CLIP tokenizer; PAD falls back to EOS as in OpenAI CLIP. SigLIP: BOS is None (its
    tokenizer adds none, only EOS `</s>`)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if (family.has_bos and bos is None) or eos is None:
        raise ValueError(f"{type(tokenizer).__name__} has no {'BOS/' if family.has_bos else ''}EOS token; a "
                         f"{family.name} tokenizer is needed.")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return (int(bos) if family.has_bos else None), int(eos), int(pad)


@dataclass
class PromptBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


def pad_rows(rows: list[list[int]], pad_id: int, *, max_length: int | None = None) -> PromptBatch:
    """Rows padded with `pad_id`: to the longest row with a 0/1 attention mask (CLIP), or with `max_length` to that
    length with every position attended (SigLIP, as its processor: `padding="max_length"`, no attention mask)."""
    length = max_length or max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.full((len(rows), length), int(max_length is not None), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return PromptBatch(ids, mask)


def _layout(body: list[list[int]], bos: int | None, eos: int, pad: int, class_names: list[str], max_length: int,
            family: TextFamily) -> PromptBatch:
    """`[BOS] body [EOS]` (SigLIP: `body </s>`), checked to fit and padded as the family expects."""
    rows = [([bos] if family.has_bos else []) + ids + [eos] for ids in body]
    _check_fits(rows, class_names, max_length)
    return pad_rows(rows, pad, max_length=max_length if family.pad_to_max_length else None)


def _check_fits(rows: list[list[int]], class_names: list[str], max_length: int) -> None:
    for name, row in zip(class_names, rows):
        if len(row) > max_length:
            raise ValueError(
                f"class name {name!r} does not fit the text context: its prompt is {len(row)} tokens, the text "
                f"tower has {max_length} positions. Shorten the class name."
            )


def placeholder_prompt_ids(
    class_names: list[str],
    n_ctx: int,
    placeholder_id: int,
    *,
    tokenizer=None,
    class_token_ids: list[list[int]] | None = None,
    suffix: str = ".",
    bos_id: int | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
    max_length: int = 77,
    family: TextFamily = CLIP_TEXT,
) -> PromptBatch:
    """Rows `[BOS] X*n <class tokens> <suffix tokens> [EOS]` padded with PAD (CoOp's "X X X X {class}."); for
    `family=SIGLIP_TEXT` rows `X*n <class tokens> <suffix tokens> </s>` padded to `max_length` (SigLIP's layout).

    Built from ids, so the context always sits at positions 1..n (SigLIP: 0..n-1) whatever the tokenizer does with
    "X X X X". Either a tokenizer or raw `class_token_ids` (with eos/pad ids, and bos_id for CLIP) must be given.
    """
    if tokenizer is not None:
        bos, eos, pad = special_ids(tokenizer, family)
        body = [list(tokenizer(name + suffix, add_special_tokens=False)["input_ids"]) for name in class_names]
    else:
        if class_token_ids is None or eos_id is None or (family.has_bos and bos_id is None):
            raise ValueError(f"placeholder_prompt_ids needs a tokenizer, or class_token_ids with "
                             f"{'bos_id and ' if family.has_bos else ''}eos_id.")
        bos, eos, pad = bos_id, eos_id, eos_id if pad_id is None else pad_id
        body = [list(ids) for ids in class_token_ids]
    return _layout([[placeholder_id] * n_ctx + ids for ids in body], bos, eos, pad, class_names, max_length, family)


def template_prompt_ids(class_names: list[str], template: str, tokenizer, max_length: int = 77,
                        family: TextFamily = CLIP_TEXT) -> PromptBatch:
    """Rows `[BOS] template.format(class) [EOS]`: the zero-shot CLIP prompts (SigLIP: `template.format(class) </s>`
    padded to `max_length`)."""
    bos, eos, pad = special_ids(tokenizer, family)
    body = [list(tokenizer(template.format(n), add_special_tokens=False)["input_ids"]) for n in class_names]
    return _layout(body, bos, eos, pad, class_names, max_length, family)


def token_prompt_ids(class_names: list[str], class_token_ids: list[list[int]], prefix_ids: list[int],
                     special: tuple[int | None, int, int], max_length: int,
                     family: TextFamily = CLIP_TEXT) -> PromptBatch:
    """Tokenizer-free zero-shot prompts: `[BOS] prefix class [EOS]` from ids (SigLIP: no BOS, padded to
    `max_length`); `special` = (bos, eos, pad), bos unused for SigLIP."""
    bos, eos, pad = special
    return _layout([list(prefix_ids) + list(ids) for ids in class_token_ids], bos, eos, pad, class_names,
                   max_length, family)
