from ...peft_hooks import register_peft_method
from .config import ConsolidatorConfig
from .layer import ConsolidatorLayer, ConsolidatorLinear
from .model import ConsolidatorModel
from .pattern import BranchPattern, shuffle_permutation, support_index

__all__ = [
    "BranchPattern",
    "ConsolidatorConfig",
    "ConsolidatorLayer",
    "ConsolidatorLinear",
    "ConsolidatorModel",
    "shuffle_permutation",
    "support_index",
]

register_peft_method(name="consolidator", config_cls=ConsolidatorConfig, model_cls=ConsolidatorModel)
