from ...peft_hooks import register_peft_method
from .config import ToMeConfig
from .layer import ToMeBlock, ToMeLayer
from .model import ToMeModel

__all__ = ["ToMeBlock", "ToMeConfig", "ToMeLayer", "ToMeModel"]

register_peft_method(name="tome", config_cls=ToMeConfig, model_cls=ToMeModel)
