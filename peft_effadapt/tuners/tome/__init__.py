from ...peft_hooks import register_peft_method
from .blocks import (
    SUPPORTED_MODELS,
    MergeContext,
    MergeSettings,
    TokenState,
    make_merging_block,
    run_merging_block,
)
from .config import TokenMergingConfig, ToMeConfig
from .layer import TokenMergingLayer, ToMeBlock, ToMeLayer
from .model import TokenMergingModel, ToMeModel

__all__ = [
    "SUPPORTED_MODELS",
    "MergeContext",
    "MergeSettings",
    "ToMeBlock",
    "ToMeConfig",
    "ToMeLayer",
    "ToMeModel",
    "TokenMergingConfig",
    "TokenMergingLayer",
    "TokenMergingModel",
    "TokenState",
    "make_merging_block",
    "run_merging_block",
]

register_peft_method(name="tome", config_cls=ToMeConfig, model_cls=ToMeModel)
