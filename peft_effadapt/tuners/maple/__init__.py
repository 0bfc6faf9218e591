from .config import MaPLeConfig
from .layer import MaPLeLayer
from .model import MaPLeModel

__all__ = ["MaPLeConfig", "MaPLeLayer", "MaPLeModel"]
