"""`ResRepConfig`: the options of `ResRepCallback`."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import PruningConfig, check_number


@dataclass
class ResRepConfig(PruningConfig):
    """ResRep options, validated on construction (`ValueError` naming the field).

    The shared options of C-SGD and ResRep follow the ResRep ones below; `groups` defaults to "internal", the paper's
    setting; "streams"/"all" also prune residual streams with one compactor shared by all producers of a stream.

    Args:
        flops_target: Remaining fraction of the model's FLOPs (0.455 for the paper's ResNet-50).
        lasso_strength: lambda of the group-lasso gradient lambda·Q[i]/||Q[i]||, added to every row.
        mask_interval: Optimizer steps between mask updates (after the warm-up).
        warmup_epochs: Epochs before the first mask update.
        warmup_steps: Steps before the first mask update (overrides `warmup_epochs`).
        begin_granularity: New masked channels allowed per update while above target.
        min_channels: Smallest width per group (absolute).
        min_keep_ratio: Smallest width per group as a fraction of the original (None: only `min_channels`).
        conversion_threshold: Compactor rows with a smaller L2 norm are dropped when slimming.
        freeze_masks_after: Fraction of the total steps after which masks stop changing (None: never).
        drop_masked_rows: Also drop masked rows still above the threshold (the change is reported / warned).
    """

    groups: str | list = "internal"
    flops_target: float = 0.455
    lasso_strength: float = 1e-4
    mask_interval: int = 200
    warmup_epochs: float = 5.0
    warmup_steps: int | None = None
    begin_granularity: int = 4
    min_channels: int = 1
    min_keep_ratio: float | None = None
    conversion_threshold: float = 1e-5
    freeze_masks_after: float | None = None
    drop_masked_rows: bool = False

    def __post_init__(self):
        super().__post_init__()
        check_number("flops_target", self.flops_target, low=0.0, high=1.0, low_open=True, high_open=True)
        check_number("lasso_strength", self.lasso_strength, low=0.0)
        check_number("mask_interval", self.mask_interval, low=1, integer=True)
        check_number("warmup_epochs", self.warmup_epochs, low=0.0)
        if self.warmup_steps is not None:
            check_number("warmup_steps", self.warmup_steps, low=0, integer=True)
        check_number("begin_granularity", self.begin_granularity, low=1, integer=True)
        check_number("min_channels", self.min_channels, low=1, integer=True)
        if self.min_keep_ratio is not None:
            check_number("min_keep_ratio", self.min_keep_ratio, low=0.0, high=1.0)
        check_number("conversion_threshold", self.conversion_threshold, low=0.0)
        if self.freeze_masks_after is not None:
            check_number("freeze_masks_after", self.freeze_masks_after, low=0.0, high=1.0, low_open=True)
        if not isinstance(self.drop_masked_rows, bool):
            raise ValueError(f"drop_masked_rows must be True or False, got {self.drop_masked_rows!r}.")
