from ...peft_hooks import register_peft_method
from .config import CoOpConfig
from .layer import CoOpLayer
from .model import CoOpModel

__all__ = ["CoOpConfig", "CoOpLayer", "CoOpModel"]

register_peft_method(name="coop", config_cls=CoOpConfig, model_cls=CoOpModel)
