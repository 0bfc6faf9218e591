from __future__ import annotations

from dataclasses import dataclass

from peft.utils import PeftType

from ...prompting.config import DeepPromptConfig


@dataclass
class MaPLeConfig(DeepPromptConfig):
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

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.MAPLE
        if self.csc:
            raise ValueError("MaPLe learns one unified context; csc=True (class-specific context) is not supported.")
