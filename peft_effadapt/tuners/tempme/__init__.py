from ...peft_hooks import register_peft_method
from .config import PRESETS, TESTBED, VIT_B16_INFERRED, VIT_B32, TempMeConfig
from .layer import TempMeBlock, TempMeLayer, TempMeSettings
from .model import TempMeModel
from .schedule import LayerPlan, plan_table, tempme_plan

__all__ = [
    "PRESETS",
    "TESTBED",
    "VIT_B16_INFERRED",
    "VIT_B32",
    "LayerPlan",
    "TempMeBlock",
    "TempMeConfig",
    "TempMeLayer",
    "TempMeModel",
    "TempMeSettings",
    "plan_table",
    "tempme_plan",
]

register_peft_method(name="tempme", config_cls=TempMeConfig, model_cls=TempMeModel)
