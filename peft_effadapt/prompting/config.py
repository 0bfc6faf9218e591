"""Fields every CLIP/SigLIP text-prompt method shares (CoOp, RLP, QPrompt, CoCoOp, MaPLe), and their token-id
resolution."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig

from ..peft_hooks import VerifiedAdapterFilesMixin
from .layer import PromptSlots

CLASS_TOKEN_POSITIONS = ("end",)


@dataclass
class ContextPromptConfig(VerifiedAdapterFilesMixin, PeftConfig):
    """Base of the configs of CLIP text-prompt methods: n learnable context rows written at n placeholder tokens
    right after BOS ("[BOS] X X X X {class}. [EOS]"), with the token ids kept so that the causal mask and EOS pooling
    of the Hugging Face CLIP text tower are unchanged. On a `SiglipModel` the context starts at position 0 ("X X X X
    {class}. </s>" padded to max_length: SigLIP has no BOS and pools the last position); `context_start` records it.

    Token ids are stored in the config (`ctx_init_token_ids`, `placeholder_token_id`), so a saved adapter reloads
    without a tokenizer. When they are missing, `resolve_tokens(tokenizer)` fills them in; otherwise the tuner loads a
    tokenizer from `tokenizer_name_or_path` (or the base model's `name_or_path`) when it is built.
    """

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Name of the text embeddings module (a CLIPTextEmbeddings or SiglipTextEmbeddings). None: found "
            "automatically ('text_model.embeddings' in CLIPModel/SiglipModel, 'embeddings' in CLIPTextModel)."
        },
    )
    n_ctx: int | None = field(
        default=None,
        metadata={
            "help": "Number of context tokens. None: the token count of ctx_init (4 for 'a photo of a'), or 4 "
            "without ctx_init. Must equal that token count when both are given."
        },
    )
    ctx_init: str | None = field(
        default="a photo of a",
        metadata={"help": "Text whose token embeddings initialise the context (no BOS/EOS). None: random init."},
    )
    ctx_init_token_ids: list[int] | None = field(
        default=None,
        metadata={"help": "Token ids of ctx_init (filled in from a tokenizer when None; give them for raw vocabularies)."},
    )
    placeholder_token: str = field(
        default="X", metadata={"help": "The token that occupies the context slots in the tokenised prompts."}
    )
    placeholder_token_id: int | None = field(
        default=None, metadata={"help": "Id of placeholder_token (filled in from a tokenizer when None)."}
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Tokenizer used to resolve missing token ids. None: the base model's name_or_path."},
    )
    class_token_position: Literal["end"] = field(
        default="end",
        metadata={
            "help": "Where the class name goes. Only 'end' (context right after BOS, the RLP and CoOp base-to-novel "
            "setting) is implemented; CoOp's 'middle'/'front' would move the context per class."
        },
    )
    context_start: int | None = field(
        default=None,
        metadata={
            "help": "Position of the first context token: 1 (after BOS, CLIP) or 0 (SigLIP, no BOS). None: derived "
            "from the model's text tower at injection and stored, so a saved adapter reloads with the same layout "
            "(adapters saved without it are CLIP's)."
        },
    )
    class_template_suffix: str = field(default=".", metadata={"help": "Text after the class name in each prompt."})
    csc: bool = field(
        default=False,
        metadata={
            "help": "Class-specific context: one context per class (needs num_classes; the text batch must be the "
            "class prompts in class order). Cannot transfer to novel classes and cannot be merged."
        },
    )
    num_classes: int | None = field(default=None, metadata={"help": "Number of classes when csc=True."})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra modules trained and saved in full (none for the prompt methods)."}
    )
    init_std: float = field(default=0.02, metadata={"help": "Std of randomly initialised prompt parameters."})
    init_weights: bool = field(
        default=True, metadata={"help": "False: start from large random values (tests of merging and reloading)."}
    )

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)
        if self.n_ctx is not None and (not isinstance(self.n_ctx, int) or isinstance(self.n_ctx, bool)
                                       or self.n_ctx < 1):
            raise ValueError(f"n_ctx must be a positive int (the number of context tokens), got {self.n_ctx!r}.")
        if self.ctx_init is not None and (not isinstance(self.ctx_init, str) or not self.ctx_init.strip()):
            raise ValueError(f"ctx_init must be a non-empty string or None, got {self.ctx_init!r}.")
        if self.ctx_init_token_ids is not None:
            ids = list(self.ctx_init_token_ids)
            if not ids or any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in ids):
                raise ValueError(f"ctx_init_token_ids must be a non-empty list of token ids, got {ids!r}.")
            if self.n_ctx is not None and self.n_ctx != len(ids):
                raise ValueError(
                    f"n_ctx={self.n_ctx} but ctx_init {self.ctx_init!r} has {len(ids)} tokens {ids}; n_ctx must "
                    "equal the token count of ctx_init (leave it None to derive it)."
                )
            self.ctx_init_token_ids = ids
            self.n_ctx = len(ids)
        elif self.ctx_init is None and self.n_ctx is None:
            self.n_ctx = 4
        if self.placeholder_token_id is not None and (
            not isinstance(self.placeholder_token_id, int) or self.placeholder_token_id < 0
        ):
            raise ValueError(f"placeholder_token_id must be a token id >= 0, got {self.placeholder_token_id!r}.")
        if self.class_token_position not in CLASS_TOKEN_POSITIONS:
            raise ValueError(
                f"class_token_position={self.class_token_position!r} is not supported; only 'end' is implemented "
                "(context right after BOS)."
            )
        if self.context_start is not None and (isinstance(self.context_start, bool)
                                               or self.context_start not in (0, 1)):
            raise ValueError(
                f"context_start must be 1 (CLIP, after BOS), 0 (SigLIP, no BOS) or None, got {self.context_start!r}."
            )
        if self.csc and (not isinstance(self.num_classes, int) or self.num_classes < 1):
            raise ValueError(f"csc=True needs num_classes (a positive int), got {self.num_classes!r}.")
        if not isinstance(self.init_std, (int, float)) or self.init_std <= 0:
            raise ValueError(f"init_std must be > 0, got {self.init_std!r}.")

    @property
    def tokens_resolved(self) -> bool:
        return self.placeholder_token_id is not None and (
            self.ctx_init is None or self.ctx_init_token_ids is not None
        )

    def prompt_slots(self) -> PromptSlots:
        """Where this adapter writes (context_start None: CLIP's layout)."""
        start = 1 if self.context_start is None else self.context_start
        return PromptSlots(self.n_ctx, self.placeholder_token_id, self.num_classes if self.csc else None, start)

    def resolve_tokens(self, tokenizer) -> ContextPromptConfig:
        """Fills `ctx_init_token_ids`, `n_ctx` and `placeholder_token_id` from a tokenizer; returns self."""
        from .text import context_token_ids, single_token_id

        if self.ctx_init is not None and self.ctx_init_token_ids is None:
            ids = context_token_ids(tokenizer, self.ctx_init)
            if self.n_ctx is not None and self.n_ctx != len(ids):
                raise ValueError(
                    f"n_ctx={self.n_ctx} but ctx_init {self.ctx_init!r} has {len(ids)} tokens {ids} with this "
                    "tokenizer; n_ctx must equal the token count of ctx_init (leave it None to derive it)."
                )
            self.ctx_init_token_ids, self.n_ctx = ids, len(ids)
        if self.placeholder_token_id is None:
            self.placeholder_token_id = single_token_id(tokenizer, self.placeholder_token)
        return self


@dataclass(frozen=True)
class DeepPromptShape:
    """m learned leading context tokens, written at depth J (layers 0..J-1 of both towers get prompts)."""

    n_ctx: int
    depth: int


@dataclass
class DeepPromptConfig(ContextPromptConfig):
    """Base of the configs whose adapters may carry MaPLe's deep multimodal prompts (MaPLe; QPrompt with
    host='maple'): the deep-prompt fields, their checks and the shape they give (`deep_shape`)."""

    maple_n_ctx: int = field(
        default=2,
        metadata={"help": "Deep prompts: learned leading context tokens m; the rest of ctx_init stays fixed text ('of "
                  "a' of 'a photo of a', as in MaPLe). Used by MaPLe and by QPrompt with host='maple'."},
    )
    prompt_depth: int = field(
        default=9,
        metadata={"help": "Deep prompts: depth J, layers 0..J-1 of both towers get prompts. Used by MaPLe and by "
                  "QPrompt with host='maple'."},
    )

    @property
    def deep_prompts(self) -> bool:
        """True when this adapter has deep prompts."""
        return True

    def deep_shape(self) -> DeepPromptShape | None:
        """(m, J) of the deep prompts, None for an adapter without them."""
        return DeepPromptShape(self.maple_n_ctx, self.prompt_depth) if self.deep_prompts else None

    def __post_init__(self):
        super().__post_init__()
        for name in ("maple_n_ctx", "prompt_depth"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}.")
        self._check_learned_tokens()

    def resolve_tokens(self, tokenizer) -> DeepPromptConfig:
        super().resolve_tokens(tokenizer)
        self._check_learned_tokens()
        return self

    def _check_learned_tokens(self) -> None:
        """m <= n: the learned tokens are the first m of the n ctx_init tokens (checked once n is known)."""
        if self.deep_prompts and self.n_ctx is not None and self.maple_n_ctx > self.n_ctx:
            raise ValueError(f"maple_n_ctx={self.maple_n_ctx} exceeds n_ctx={self.n_ctx} (the ctx_init tokens).")
