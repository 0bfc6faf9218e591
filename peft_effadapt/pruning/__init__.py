"""Structured pruning: coupled-channel groups, slimming plans and surgery, FLOPs, and the C-SGD / ResRep callbacks."""

from .flops import FlopsModel, count_flops, round_to
from .groups import ChannelGroup, find_channel_groups
from .plan import PLAN_NAME, GroupPlan, SlimmingPlan, l1_scores, load_slimmed, plan_from_widths, save_slimmed
from .surgery import applied_plan, apply_plan

__all__ = [
    "PLAN_NAME",
    "ChannelGroup",
    "FlopsModel",
    "GroupPlan",
    "SlimmingPlan",
    "applied_plan",
    "apply_plan",
    "count_flops",
    "find_channel_groups",
    "l1_scores",
    "load_slimmed",
    "plan_from_widths",
    "round_to",
    "save_slimmed",
]

from .compactor import ResRepCompactor  # noqa: E402
from .csgd import CentripetalSGDCallback  # noqa: E402
from .resrep import ResRepCallback, build_resrep_param_groups  # noqa: E402

__all__ += ["CentripetalSGDCallback", "ResRepCallback", "ResRepCompactor", "build_resrep_param_groups"]
