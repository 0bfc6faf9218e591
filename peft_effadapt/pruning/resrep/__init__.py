"""ResRep (Ding et al., ICCV 2021): compactors, the mask schedule, and the Trainer callback."""

from .callback import ResRepCallback
from .compactor import ResRepCompactor
from .config import ResRepConfig
from .optim import resrep_param_groups
from .schedule import choose_masks, masked_widths

__all__ = ["ResRepCallback", "ResRepCompactor", "ResRepConfig", "choose_masks", "masked_widths",
           "resrep_param_groups"]
