"""Token-merging core shared by ToMe, PYRA and TempMe: bipartite soft matching, size-weighted merging, source
tracing, proportional-attention bias, clip grouping and merging schedules. Pure tensor functions; no model code."""

from .grouping import group_sequences, ungroup_protected
from .matching import (
    MAX_PROTECTED,
    MergePlan,
    Modulation,
    bipartite_soft_matching,
    init_source,
    log_size_bias,
    max_mergeable,
    merge_source,
    merge_tokens,
    merge_wavg,
    tokens_by_group,
)
from .schedules import (
    PRESET_NAMES,
    PYRA_PRESETS,
    check_schedule,
    clamp_schedule,
    decreasing_schedule,
    ramp_schedule,
    resolve_schedule,
    scaled_preset,
    token_counts,
    validate_spec,
)

__all__ = [
    "MAX_PROTECTED",
    "PRESET_NAMES",
    "PYRA_PRESETS",
    "MergePlan",
    "Modulation",
    "bipartite_soft_matching",
    "check_schedule",
    "clamp_schedule",
    "decreasing_schedule",
    "init_source",
    "log_size_bias",
    "max_mergeable",
    "merge_source",
    "merge_tokens",
    "merge_wavg",
    "ramp_schedule",
    "resolve_schedule",
    "scaled_preset",
    "token_counts",
    "tokens_by_group",
    "validate_spec",
    # TempMe: clip grouping
    "group_sequences",
    "ungroup_protected",
]
