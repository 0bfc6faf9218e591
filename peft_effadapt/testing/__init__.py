"""Testbed: tiny model factories for unit tests, generated datasets and the bundled small trained checkpoints."""

from .factories import (
    tiny_clip,
    tiny_clip_config,
    tiny_clip_vision,
    tiny_pixel_values,
    tiny_text_inputs,
    tiny_vit,
    tiny_vit_config,
)

__all__ = [
    "tiny_clip",
    "tiny_clip_config",
    "tiny_clip_vision",
    "tiny_pixel_values",
    "tiny_text_inputs",
    "tiny_vit",
    "tiny_vit_config",
]
