from .config import QPromptConfig
from .layer import QPromptLayer
from .model import QPromptModel
from .tensors import QuantizedTensors

__all__ = ["QPromptConfig", "QPromptLayer", "QPromptModel", "QuantizedTensors"]
