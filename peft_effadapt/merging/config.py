"""Config bases of the token-merging types: the fields ToMe, PYRA and TempMe share, and the schedule fields of ToMe
and PYRA (the schedule forms themselves are described in `schedules`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft.config import PeftConfig

from ..peft_hooks import VerifiedAdapterFilesMixin
from .matching import MAX_PROTECTED
from .schedules import validate_spec

SCHEDULE_HELP = (
    "Tokens merged away per encoder layer: an int r (constant), a list with one r per layer (padded with zeros), "
    "{'r': r, 'inflect': x} (ToMe's linear ramp; inflect=-1 is the 'decreasing' schedule 2r -> 0), or PYRA's preset "
    "'low' / 'high' (official tables for ViT-B/16, DeiT-B and ViT-L/16 at 224²; scaled to other depths and token "
    "counts). Each r_l must be at most (tokens entering layer l - protected) // 2."
)


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class MergingConfigBase(VerifiedAdapterFilesMixin, PeftConfig):
    """Fields every token-merging PEFT type has (ToMe, PYRA, TempMe). Not registered itself."""

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Encoder layers to make merging layers (a regex or names). None: every encoder layer of the vision "
            r"tower (ViT/DeiT: 'layers\.\d+'; CLIPModel: 'vision_model\.encoder\.layers\.\d+'; the CLIP text tower "
            "is never merged). Every encoder layer of the tower must be a target."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Names or regex of modules to leave alone."}
    )
    prop_attn: bool = field(
        default=True,
        metadata={"help": "Proportional attention: add log(token size) to the attention logits of every key."},
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained and saved in full, e.g. ['classifier']."}
    )
    num_tokens: int | None = field(
        default=None,
        metadata={"help": "Set when the adapter is created: tokens entering the first encoder layer (incl. CLS)."},
    )
    init_weights: bool = field(
        default=True, metadata={"help": "False: start trainable tensors at random values (tests only)."}
    )

    _min_num_tokens = 1  # a ClassVar (no annotation): not a config field

    def __post_init__(self):
        super().__post_init__()
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                setattr(self, name, set(value))
        if self.num_tokens is not None and (not is_int(self.num_tokens) or self.num_tokens < self._min_num_tokens):
            raise ValueError(f"num_tokens must be an int >= {self._min_num_tokens}, got {self.num_tokens!r}.")
        for name in ("prop_attn", "init_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}.")


@dataclass
class TokenMergingConfig(MergingConfigBase):
    """Fields shared by the schedule-driven token-merging PEFT types (ToMe and PYRA). Not registered itself."""

    merge_schedule: int | str | list[int] | dict = field(default=8, metadata={"help": SCHEDULE_HELP})
    protected_tokens: int | str = field(
        default="auto",
        metadata={
            "help": "Leading tokens never merged: 'auto' (1 = CLS; 2 = CLS + distillation token for DeiT), 0, 1 or 2."
        },
    )
    trace_source: bool = field(
        default=False,
        metadata={"help": "Track which original patches every token holds (B×N×N_0 map; for visualisations)."},
    )
    layer_schedule: list[int] | None = field(
        default=None,
        metadata={
            "help": "Set when the adapter is created: merge_schedule resolved to one r per layer for the model it was "
            "created on (written to adapter_config.json; a loaded adapter uses it as is)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.merge_schedule, tuple):
            self.merge_schedule = list(self.merge_schedule)
        validate_spec(self.merge_schedule)
        if self.protected_tokens != "auto" and (
            not is_int(self.protected_tokens) or not 0 <= self.protected_tokens <= MAX_PROTECTED
        ):
            raise ValueError(f"protected_tokens must be 'auto', 0, 1 or 2, got {self.protected_tokens!r}.")
        if self.layer_schedule is not None:
            if not isinstance(self.layer_schedule, (list, tuple)) or any(
                not is_int(r) or r < 0 for r in self.layer_schedule
            ):
                raise ValueError(f"layer_schedule must be a list of ints >= 0, got {self.layer_schedule!r}.")
            self.layer_schedule = list(self.layer_schedule)
        if not isinstance(self.trace_source, bool):
            raise ValueError(f"trace_source must be a bool, got {self.trace_source!r}.")
