"""Structured pruning, laid out as a shared core and one folder per method.

Core: coupled-channel groups (`groups.py`), the FLOPs model (`flops.py`), slimming plans (`plan.py`), physical channel
removal (`surgery.py`), slimmed save/load (`slimmed.py`), shared options (`config.py`) and the Trainer core of the
callbacks (`trainer.py`). Methods: `csgd/` (Centripetal SGD) and `resrep/` (ResRep).
"""

from .config import PruningConfig
from .csgd import CentripetalSGDCallback, CSGDConfig, csgd_param_groups
from .flops import FlopsModel, aligned_multiple, count_flops, round_to, width_multiple, widths_for_flops
from .groups import GROUP_FAMILIES, ChannelGroup, find_channel_groups, select_groups
from .plan import PLAN_NAME, GroupPlan, SlimmingPlan, l1_scores, plan_from_widths
from .resrep import ResRepCallback, ResRepCompactor, ResRepConfig, resrep_param_groups
from .slimmed import load_slimmed, save_slimmed
from .surgery import applied_plan, apply_plan
from .trainer import PruningCallback

__all__ = [
    "GROUP_FAMILIES",
    "PLAN_NAME",
    "CSGDConfig",
    "CentripetalSGDCallback",
    "ChannelGroup",
    "FlopsModel",
    "GroupPlan",
    "PruningCallback",
    "PruningConfig",
    "ResRepCallback",
    "ResRepCompactor",
    "ResRepConfig",
    "SlimmingPlan",
    "aligned_multiple",
    "applied_plan",
    "apply_plan",
    "count_flops",
    "csgd_param_groups",
    "find_channel_groups",
    "l1_scores",
    "load_slimmed",
    "plan_from_widths",
    "resrep_param_groups",
    "round_to",
    "save_slimmed",
    "select_groups",
    "width_multiple",
    "widths_for_flops",
]
