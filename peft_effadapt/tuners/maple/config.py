from __future__ import annotations

from dataclasses import dataclass, field

from peft.utils import PeftType

from ...prompting import ContextPromptConfig


@dataclass
class MaPLeConfig(ContextPromptConfig):
    """Configuration of a [`MaPLeModel`] (Khattak et al., "MaPLe: Multi-modal Prompt Learning", CVPR 2023): prompts in
    both CLIP towers, tied by learned couplings.

    The text prompt keeps the full `ctx_init` ("a photo of a") and learns its first `maple_n_ctx` (2) token
    embeddings; the rest stay fixed words. A linear projection maps those m text vectors to m visual tokens appended
    after the patch tokens. For layers 1..J-1 (`prompt_depth` J) fresh text prompts overwrite positions 1..m of the
    text stream at the layer input, and a per-layer coupling Linear(d_text -> d_vision) of them overwrites the last m
    visual tokens. Defaults are MaPLe's base-to-novel recipe (`vit_b16_c2_ep5_batch4_2ctx`: m = 2, J = 9); the
    reference's fp16 hard-casts are not reproduced (prompts stay in the adapter's fp32 and follow the input dtype).
    Not mergeable: the visual prompts change the image encoder.
    """

    maple_n_ctx: int = field(
        default=2,
        metadata={"help": "Learned leading context tokens; the rest of ctx_init stays fixed text ('of a' of 'a photo "
                  "of a', as in MaPLe)."},
    )
    prompt_depth: int = field(default=9, metadata={"help": "Depth J: layers 0..J-1 of both towers get prompts."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.MAPLE
        if self.csc:
            raise ValueError("MaPLe learns one unified context; csc=True (class-specific context) is not supported.")
        if not isinstance(self.maple_n_ctx, int) or isinstance(self.maple_n_ctx, bool) or self.maple_n_ctx < 1:
            raise ValueError(f"maple_n_ctx must be a positive int, got {self.maple_n_ctx!r}.")
        if self.n_ctx is not None and self.maple_n_ctx > self.n_ctx:
            raise ValueError(f"maple_n_ctx={self.maple_n_ctx} exceeds n_ctx={self.n_ctx} (the ctx_init tokens).")
        if not isinstance(self.prompt_depth, int) or isinstance(self.prompt_depth, bool) or self.prompt_depth < 1:
            raise ValueError(f"prompt_depth must be a positive int, got {self.prompt_depth!r}.")
