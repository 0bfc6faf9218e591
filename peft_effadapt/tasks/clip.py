"""The CLIP (or SigLIP) model behind a task wrapper's model, checked by class (subclasses are accepted)."""

from __future__ import annotations

from torch import nn
from transformers.models.clip.modeling_clip import CLIPModel
from transformers.models.siglip.modeling_siglip import SiglipModel


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def clip_of(model: nn.Module, wrapper: str) -> CLIPModel:
    """`model` itself, or the base model of a PeftModel around it; TypeError unless it is a `CLIPModel`."""
    base = _base(model)
    if not isinstance(base, CLIPModel):
        raise TypeError(
            f"{wrapper} needs a CLIPModel or a subclass of it (or a PeftModel around one), got {type(base).__name__}."
        )
    return base


def dual_encoder_of(model: nn.Module, wrapper: str) -> CLIPModel | SiglipModel:
    """Like `clip_of`, also accepting a `SiglipModel` (or a subclass)."""
    base = _base(model)
    if not isinstance(base, (CLIPModel, SiglipModel)):
        raise TypeError(
            f"{wrapper} needs a CLIPModel or a subclass of it, or a SiglipModel or a subclass of it (or a PeftModel "
            f"around one), got {type(base).__name__}."
        )
    return base


def is_siglip(model: nn.Module) -> bool:
    """True for a `SiglipModel` (sigmoid head: exp(logit_scale) * cos + logit_bias)."""
    return isinstance(model, SiglipModel)
