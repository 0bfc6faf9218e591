from __future__ import annotations

from dataclasses import dataclass

from peft.utils import PeftType

from ...prompting import ContextPromptConfig


@dataclass
class CoOpConfig(ContextPromptConfig):
    """Configuration of a [`CoOpModel`] (Zhou et al., "Learning to Prompt for Vision-Language Models", IJCV 2022):
    a dense learnable context of n token embeddings written after BOS in CLIP's text prompts.

    Defaults follow CoOp's base-to-novel recipe (`vit_b16_ctxv1`): n=4 initialised from "a photo of a", unified
    context, class name at the end. `csc=True` gives the class-specific variant (C x n x d parameters).
    """

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.COOP
