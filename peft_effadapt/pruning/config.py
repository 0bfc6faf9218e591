"""Options shared by the pruning callbacks (`CSGDConfig`, `ResRepConfig` extend `PruningConfig`), validated on
construction like the PEFT configs."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from torch import nn

from .flops import check_round_to, width_multiple
from .groups import GROUP_FAMILIES, ChannelGroup


@dataclass
class PruningConfig:
    """Options common to C-SGD and ResRep.

    Args:
        groups: Which channel groups to prune: "internal" (layers inside blocks / MLPs), "streams" (residual streams
            and the stem), "all", a list of glob patterns on group names / producer paths, or a list of
            `ChannelGroup`.
        round_to: Keep every pruned width a multiple of this int (or the full width); `"auto"`: the multiple that
            suits the device the model is on when the widths are chosen (`aligned_multiple`: 8 on CUDA, 16 on CPU);
            None or 1: any width. FLOPs targets are met with the rounded widths.
        slim_on_train_end: Slim the model in place when `Trainer.train()` ends.
        check_equivalence: Compare the eval outputs of the unslimmed (converted) and the slimmed model before keeping
            the slimmed one.
        equivalence_tol: The allowed change of that check is `equivalence_tol * max(1, max |output|)`.
        save_dir: Where the main process writes the slimmed model (`save_slimmed`) after slimming on train end; a
            relative path is taken inside `TrainingArguments.output_dir`; None = do not save.
        allow_adaptive_optimizer: Accept Adam-type optimizers (refused by default: per-element step sizes change the
            method's regulariser; see each method).
    """

    groups: str | list = "all"
    round_to: int | str | None = None
    slim_on_train_end: bool = True
    check_equivalence: bool = True
    equivalence_tol: float = 1e-5
    save_dir: str | None = "slimmed"
    allow_adaptive_optimizer: bool = False

    def __post_init__(self):
        if isinstance(self.groups, tuple):
            self.groups = list(self.groups)
        if isinstance(self.groups, list):  # ChannelGroup.to_dict() form, as stored in a Trainer checkpoint
            self.groups = [ChannelGroup.from_dict(g) if isinstance(g, dict) else g for g in self.groups]
            if not self.groups or not all(isinstance(g, (str, ChannelGroup)) for g in self.groups):
                raise ValueError(f"groups must be one of {GROUP_FAMILIES}, a non-empty list of glob patterns or of "
                                 f"ChannelGroup; got {self.groups!r}.")
        elif self.groups not in GROUP_FAMILIES:
            raise ValueError(f"groups must be one of {GROUP_FAMILIES}, a list of glob patterns or of ChannelGroup; "
                             f"got {self.groups!r}.")
        check_round_to(self.round_to)
        check_number("equivalence_tol", self.equivalence_tol, low=0.0)
        if self.save_dir is not None and not isinstance(self.save_dir, str):
            self.save_dir = str(self.save_dir)
        for name in ("slim_on_train_end", "check_equivalence", "allow_adaptive_optimizer"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}.")

    def multiple(self, model: nn.Module) -> int | None:
        """The width multiple for `model` (`round_to` resolved on the model's device), None when widths are free."""
        return width_multiple(self.round_to, model)

    def to_dict(self) -> dict:
        """JSON-ready fields (groups given as `ChannelGroup` are stored with `to_dict`): constructor keyword args."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        if isinstance(self.groups, list):
            data["groups"] = [g.to_dict() if isinstance(g, ChannelGroup) else g for g in self.groups]
        return {k: (asdict(v) if hasattr(v, "__dataclass_fields__") else v) for k, v in data.items()}


def check_number(name: str, value, *, low: float | None = None, high: float | None = None, integer: bool = False,
                 low_open: bool = False, high_open: bool = False) -> None:
    """Raises `ValueError` naming `name` unless `value` is a real (int if `integer`) number within the bounds."""
    kind = "an int" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or \
            (isinstance(value, float) and not math.isfinite(value)):
        raise ValueError(f"{name} must be {kind}, got {value!r}.")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}.")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value!r}.")
