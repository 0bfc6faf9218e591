from ...peft_hooks import register_peft_method
from .config import CoCoOpConfig
from .layer import CoCoOpLayer
from .model import CoCoOpModel

__all__ = ["CoCoOpConfig", "CoCoOpLayer", "CoCoOpModel"]

register_peft_method(name="cocoop", config_cls=CoCoOpConfig, model_cls=CoCoOpModel)
