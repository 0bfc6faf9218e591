from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peft.utils import PeftType

from ...prompting import ContextPromptConfig

INITS = ("zero", "svd", "random")
DROPOUT_MODES = ("element", "branch")


@dataclass
class RLPConfig(ContextPromptConfig):
    """Configuration of an [`RLPModel`] (Hao et al., "Re-parameterized Low-rank Prompt: Generalize a
    Vision-Language Model within 0.5K Parameters", arXiv:2312.10813).

    The prompt written after BOS is P = F + Drop(A @ B) with trainable A (n x r) and B (r x d) and a frozen path F:
    P0 (the token embeddings of `ctx_init`) for `init` 'zero'/'random', the residual P0 - svd_r(P0) for 'svd', and
    0 with `use_init_path=False`. In eval the prompt collapses to P* = F + A @ B; only A and B are saved (n*r + r*d
    numbers: 516 for n=4, r=1, d=512), F is rebuilt from the base model's vocabulary.

    No official code exists; every choice the paper leaves open ([A] in the spec) is a field: `init`, `init_std`,
    `lowrank_dropout`, `dropout_mode`, `use_init_path`, `rank`.
    """

    rank: int = field(default=1, metadata={"help": "Rank r of the learnable factorisation A (n x r) @ B (r x d)."})
    init: Literal["zero", "svd", "random"] = field(
        default="zero",
        metadata={
            "help": "'zero': A = 0, B ~ N(0, init_std^2), so the model starts as zero-shot CLIP with ctx_init "
            "(default, [A]); 'svd': A0 B0 = top-r SVD of P0 and the frozen path is the residual P0 - A0 B0; "
            "'random': A, B ~ N(0, init_std^2)."
        },
    )
    use_init_path: bool = field(
        default=True,
        metadata={
            "help": "Keep the frozen full-rank path (P0 or the SVD residual). False: P = A @ B only (rank(P) <= r), "
            "with A, B initialised from the truncated SVD of P0 (random without ctx_init)."
        },
    )
    lowrank_dropout: float = field(
        default=0.1, metadata={"help": "Dropout probability on the low-rank path A @ B in training ([A]; 0 = off)."}
    )
    dropout_mode: Literal["element", "branch"] = field(
        default="element",
        metadata={
            "help": "'element': element-wise dropout on the n x d product; 'branch': drop the whole low-rank delta "
            "with probability p per forward (rescaled by 1/(1-p))."
        },
    )
    target: Literal["text"] = field(
        default="text", metadata={"help": "Which prompt matrix is re-parameterised; only the text prompt for now."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.RLP
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"rank must be a positive int, got {self.rank!r}.")
        if self.n_ctx is not None and self.rank > self.n_ctx:
            raise ValueError(f"rank={self.rank} exceeds n_ctx={self.n_ctx}; the rank must be <= min(n_ctx, d).")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}.")
        if self.dropout_mode not in DROPOUT_MODES:
            raise ValueError(f"dropout_mode must be one of {DROPOUT_MODES}, got {self.dropout_mode!r}.")
        if not isinstance(self.lowrank_dropout, (int, float)) or not 0.0 <= self.lowrank_dropout < 1.0:
            raise ValueError(f"lowrank_dropout must be a probability in [0, 1), got {self.lowrank_dropout!r}.")
        if self.target != "text":
            raise ValueError(f"target={self.target!r} is not supported; only 'text' is implemented.")

    def resolve_tokens(self, tokenizer) -> RLPConfig:
        super().resolve_tokens(tokenizer)
        if self.rank > self.n_ctx:
            raise ValueError(f"rank={self.rank} exceeds n_ctx={self.n_ctx}; the rank must be <= min(n_ctx, d).")
        return self
