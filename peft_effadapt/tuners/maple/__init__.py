from ...peft_hooks import register_peft_method
from .config import MaPLeConfig
from .layer import MaPLeLayer
from .model import MaPLeModel

__all__ = ["MaPLeConfig", "MaPLeLayer", "MaPLeModel"]

register_peft_method(name="maple", config_cls=MaPLeConfig, model_cls=MaPLeModel)
