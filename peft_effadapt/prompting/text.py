"""Token-id construction for CLIP text prompts: placeholder prompts, template prompts and their checks."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


def special_ids(tokenizer) -> tuple[int, int, int]:
    """(BOS, EOS, PAD) of a CLIP tokenizer; PAD falls back to EOS as in OpenAI CLIP."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None or eos is None:
        raise ValueError(f"{type(tokenizer).__name__} has no BOS/EOS token; a CLIP tokenizer is needed.")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return int(bos), int(eos), int(pad)


@dataclass
class PromptBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


def pad_rows(rows: list[list[int]], pad_id: int) -> PromptBatch:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return PromptBatch(ids, mask)


def _check_fits(rows: list[list[int]], class_names: list[str], max_length: int) -> None:
    for name, row in zip(class_names, rows):
        if len(row) > max_length:
            raise ValueError(
                f"class name {name!r} does not fit the text context: its prompt is {len(row)} tokens, the CLIP text "
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
) -> PromptBatch:
    """Rows `[BOS] X*n <class tokens> <suffix tokens> [EOS]` padded with PAD (CoOp's "X X X X {class}.").

    Built from ids, so the context always sits at positions 1..n whatever the tokenizer does with "X X X X".
    Either a tokenizer or raw `class_token_ids` (with bos/eos/pad ids) must be given.
    """
    if tokenizer is not None:
        bos, eos, pad = special_ids(tokenizer)
        body = [list(tokenizer(name + suffix, add_special_tokens=False)["input_ids"]) for name in class_names]
    else:
        if class_token_ids is None or bos_id is None or eos_id is None:
            raise ValueError("placeholder_prompt_ids needs a tokenizer, or class_token_ids with bos_id and eos_id.")
        bos, eos, pad = bos_id, eos_id, eos_id if pad_id is None else pad_id
        body = [list(ids) for ids in class_token_ids]
    rows = [[bos] + [placeholder_id] * n_ctx + ids + [eos] for ids in body]
    _check_fits(rows, class_names, max_length)
    return pad_rows(rows, pad)


def template_prompt_ids(class_names: list[str], template: str, tokenizer, max_length: int = 77) -> PromptBatch:
    """Rows `[BOS] template.format(class) [EOS]`: the zero-shot CLIP prompts."""
    bos, eos, pad = special_ids(tokenizer)
    rows = [[bos] + list(tokenizer(template.format(n), add_special_tokens=False)["input_ids"]) + [eos]
            for n in class_names]
    _check_fits(rows, class_names, max_length)
    return pad_rows(rows, pad)
