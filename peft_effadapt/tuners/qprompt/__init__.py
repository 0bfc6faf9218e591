from ...peft_hooks import register_peft_method
from .config import QPromptConfig
from .layer import QPromptLayer
from .model import QPromptModel
from .tensors import QuantizedTensors

__all__ = ["QPromptConfig", "QPromptLayer", "QPromptModel", "QuantizedTensors"]

register_peft_method(name="qprompt", config_cls=QPromptConfig, model_cls=QPromptModel)
