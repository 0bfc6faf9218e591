from .config import CoCoOpConfig
from .layer import CoCoOpLayer
from .model import CoCoOpModel

__all__ = ["CoCoOpConfig", "CoCoOpLayer", "CoCoOpModel"]
