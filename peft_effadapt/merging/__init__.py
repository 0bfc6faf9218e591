"""Token-merging family core shared by ToMe, PYRA and TempMe.

Pure tensor functions (ToMe's ``merge.py`` role: bipartite soft matching, size-weighted merging, source tracing,
proportional-attention bias, clip grouping, schedules), the kernel choice of proportional attention, and above them
the integration every method uses: the model families and their layer layouts, the per-forward token state, the
merging block body, the one class swap of ``merge_and_unload``, LoRA on q/k/v, and the config, layer and tuner
bases. A tuner imports this core, never another tuner.
"""

from .attention import KEY_BIAS_KERNELS, key_bias_kernel, use_key_bias_kernel
from .block import block_attention, fire_forward_hooks, run_merging_block
from .config import SCHEDULE_HELP, MergingConfigBase, TokenMergingConfig
from .families import (
    CLIP_LAYOUT,
    MODEL_FAMILIES,
    SUPPORTED_ATTENTION,
    SUPPORTED_MODELS,
    BlockLayout,
    ModelFamily,
    check_attention,
    layer_index,
    layout_of,
    model_family,
    vision_config_of,
)
from .grouping import group_sequences, ungroup_protected
from .layer import MergingBlock, TokenMergingLayer
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
    pack_weighted,
    tokens_by_group,
    unpack_weighted,
)
from .qkv_lora import init_qkv_lora, qkv_delta_fn, qkv_delta_weights
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
from .state import MergeContext, MergeSettings, TokenState
from .swap import MergingBlockMixin, swap_block_class
from .tuner import MergingTuner, TokenMergingModel

__all__ = [
    "CLIP_LAYOUT",
    "KEY_BIAS_KERNELS",
    "MAX_PROTECTED",
    "MODEL_FAMILIES",
    "PRESET_NAMES",
    "PYRA_PRESETS",
    "SCHEDULE_HELP",
    "SUPPORTED_ATTENTION",
    "SUPPORTED_MODELS",
    "BlockLayout",
    "MergeContext",
    "MergePlan",
    "MergeSettings",
    "MergingBlock",
    "MergingBlockMixin",
    "MergingConfigBase",
    "MergingTuner",
    "ModelFamily",
    "Modulation",
    "TokenMergingConfig",
    "TokenMergingLayer",
    "TokenMergingModel",
    "TokenState",
    "bipartite_soft_matching",
    "block_attention",
    "check_attention",
    "check_schedule",
    "clamp_schedule",
    "decreasing_schedule",
    "fire_forward_hooks",
    "group_sequences",
    "init_qkv_lora",
    "init_source",
    "key_bias_kernel",
    "layer_index",
    "layout_of",
    "log_size_bias",
    "max_mergeable",
    "merge_source",
    "merge_tokens",
    "merge_wavg",
    "model_family",
    "pack_weighted",
    "qkv_delta_fn",
    "qkv_delta_weights",
    "ramp_schedule",
    "resolve_schedule",
    "run_merging_block",
    "scaled_preset",
    "swap_block_class",
    "token_counts",
    "tokens_by_group",
    "ungroup_protected",
    "unpack_weighted",
    "use_key_bias_kernel",
    "validate_spec",
    "vision_config_of",
]
