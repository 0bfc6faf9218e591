from .config import CoOpConfig
from .layer import CoOpLayer
from .model import CoOpModel

__all__ = ["CoOpConfig", "CoOpLayer", "CoOpModel"]
