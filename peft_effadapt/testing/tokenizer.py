"""A CLIP BPE tokenizer trained on the caption grammar with the `tokenizers` library (no Hub access)."""

from __future__ import annotations

import json
import os
import string
import tempfile
from pathlib import Path

from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import CLIPTokenizer

from .captions import TEMPLATE, vocabulary_words
from .video import video_vocabulary_words

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIPTokenizer's own pre-tokenisation (transformers 5.23): we train with exactly the pipeline it loads with.
_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def training_corpus(extra: list[str] | None = None) -> list[str]:
    """Grammar words (weighted so whole words become single tokens), single characters so any word can be spelt
    (e.g. the 'X' placeholders of prompt learning), and the prompt template."""
    words = vocabulary_words() + video_vocabulary_words()
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    return [" ".join(words)] * 50 + [" ".join(chars)] * 5 + [TEMPLATE.format("x x x x")] * 5 + (extra or [])


def train_caption_tokenizer(save_dir: str | os.PathLike, extra: list[str] | None = None) -> CLIPTokenizer:
    """Train a byte-level BPE on the grammar and save a `CLIPTokenizer` (tokenizer.json, vocab.json, merges.txt).
    Ids: <|startoftext|> = 0, <|endoftext|> = 1 (also padding, as in OpenAI CLIP)."""
    model = BPE(unk_token=EOS, end_of_word_suffix="</w>", continuing_subword_prefix="", fuse_unk=False)
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    trainer = BpeTrainer(vocab_size=1000, min_frequency=2, special_tokens=[BOS, EOS], end_of_word_suffix="</w>",
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(training_corpus(extra), trainer=trainer)
    with tempfile.TemporaryDirectory() as tmp:
        tok.model.save(tmp)
        lines = Path(tmp, "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#version")]
    vocab = _stable_ids(tok.get_vocab(), merges)
    clip_tok = CLIPTokenizer(vocab=vocab, merges=merges)
    clip_tok.model_max_length = 64
    clip_tok.save_pretrained(str(save_dir))
    # vocab.json + merges.txt too, for loaders that do not read tokenizer.json
    (Path(save_dir) / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    (Path(save_dir) / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                               encoding="utf-8")
    return clip_tok


def _stable_ids(vocab: dict[str, int], merges: list[tuple[str, str]]) -> dict[str, int]:
    """Re-number tokens deterministically (the trainer's alphabet order and its tie-breaking between equally
    frequent merges vary from run to run): specials, single characters, then merged tokens, each sorted."""
    merged = set(a + b for a, b in merges)
    singles = sorted(set(vocab) - {BOS, EOS} - merged)
    order = [BOS, EOS] + singles + sorted(merged, key=lambda t: (len(t), t))
    if len(order) != len(vocab):
        raise ValueError(f"tokenizer vocabulary has {len(vocab)} entries but {len(order)} after re-numbering")
    return {token: i for i, token in enumerate(order)}
