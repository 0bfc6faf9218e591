from __future__ import annotations

from dataclasses import dataclass, field

from peft.utils import PeftType

from ...merging import TokenMergingConfig


@dataclass
class ToMeConfig(TokenMergingConfig):
    """Configuration of a [`ToMeModel`]: Token Merging (Bolya et al., "Token Merging: Your ViT but Faster",
    ICLR 2023) as a weight-free PEFT type for HF ViT, DeiT, CLIP vision towers and CLIPModel (vision tower only).

    Every encoder layer merges its r_l most similar token pairs (bipartite soft matching on the attention keys)
    between attention and MLP, with size-weighted averaging and proportional attention. There are no trainable
    tensors; `modules_to_save` (e.g. a new classifier) can be trained alongside.
    """

    clamp_schedule: bool = field(
        default=True,
        metadata={
            "help": "True (as the reference ToMe): an r_l above (tokens entering layer l - protected) // 2 is clamped "
            "to that bound, with one warning showing the resolved schedule, which is what `layer_schedule` records "
            "and the forward runs (inputs of another size are clamped at run time too). False: such a schedule is "
            "refused when the adapter is created, and at run time for other input sizes."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.TOME
        if not isinstance(self.clamp_schedule, bool):
            raise ValueError(f"clamp_schedule must be a bool, got {self.clamp_schedule!r}.")
