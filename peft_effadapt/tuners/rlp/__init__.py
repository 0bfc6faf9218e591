from ...peft_hooks import register_peft_method
from ...prompting.init import truncated_svd
from .config import RLPConfig
from .layer import RLPLayer, low_rank_dropout
from .model import RLPModel

__all__ = ["RLPConfig", "RLPLayer", "RLPModel", "low_rank_dropout", "truncated_svd"]

register_peft_method(name="rlp", config_cls=RLPConfig, model_cls=RLPModel)
