from .config import ToMeConfig
from .layer import ToMeBlock, ToMeLayer
from .model import ToMeModel

__all__ = ["ToMeBlock", "ToMeConfig", "ToMeLayer", "ToMeModel"]
