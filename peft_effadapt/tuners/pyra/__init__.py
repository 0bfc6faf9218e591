from ...peft_hooks import register_peft_method
from .config import PYRAConfig
from .layer import PYRABlock, PYRALayer, PYRAModulation, pyra_modulate
from .model import PYRAModel, pyra_param_groups

__all__ = ["PYRABlock", "PYRAConfig", "PYRALayer", "PYRAModel", "PYRAModulation", "pyra_modulate", "pyra_param_groups"]

register_peft_method(name="pyra", config_cls=PYRAConfig, model_cls=PYRAModel)
