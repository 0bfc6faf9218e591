from __future__ import annotations

from dataclasses import dataclass, field

from peft.utils import PeftType

from ...prompting import ContextPromptConfig


@dataclass
class CoCoOpConfig(ContextPromptConfig):
    """Configuration of a [`CoCoOpModel`] (Zhou et al., "Conditional Prompt Learning for Vision-Language Models",
    CVPR 2022): CoOp's unified context plus a meta-net π that shifts it per image, ctx_i = ctx + π(v̂_i).

    π is Linear(p -> h) -> ReLU -> Linear(h -> d) on the normalised image feature v̂ (p = CLIP's projection width,
    d = the text width, h = p // 16 by default: 512 -> 32 -> 512 for ViT-B/16, 35,360 parameters with n = 4). The text
    tower runs once per image over all classes, so the cost grows with batch x classes (the reference trains with
    batch size 1). Defaults are CoCoOp's base-to-novel recipe (`vit_b16_c4_ep10_batch1_ctxv1`): n = 4 from "a photo
    of a". Not mergeable: the prompt depends on the image.
    """

    meta_net_hidden: int | None = field(
        default=None, metadata={"help": "Hidden width h of the meta-net. None: projection_dim // 16 (as CoCoOp)."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.COCOOP
        if self.csc:
            raise ValueError("CoCoOp conditions one unified context; csc=True (class-specific context) is not supported.")
        if self.meta_net_hidden is not None and (
                not isinstance(self.meta_net_hidden, int) or isinstance(self.meta_net_hidden, bool)
                or self.meta_net_hidden < 1):
            raise ValueError(f"meta_net_hidden must be a positive int or None, got {self.meta_net_hidden!r}.")
