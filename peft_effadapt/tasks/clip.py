"""The CLIP model behind a task wrapper's model, checked by class (a subclass of `CLIPModel` is accepted)."""

from __future__ import annotations

from torch import nn
from transformers.models.clip.modeling_clip import CLIPModel


def clip_of(model: nn.Module, wrapper: str) -> CLIPModel:
    """`model` itself, or the base model of a PeftModel around it; TypeError unless it is a `CLIPModel`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(base, CLIPModel):
        raise TypeError(
            f"{wrapper} needs a CLIPModel or a subclass of it (or a PeftModel around one), got {type(base).__name__}."
        )
    return base
