from __future__ import annotations

from ...merging import MergingBlock, TokenMergingLayer


class ToMeLayer(TokenMergingLayer):
    """ToMe has no tensors: per adapter only its `MergeSettings` (r of this layer, protected tokens, ...)."""

    adapter_layer_names = ()
    other_param_names = ("tome_settings",)
    settings_attr = "tome_settings"


class ToMeBlock(MergingBlock, ToMeLayer):
    """A ViT / DeiT / CLIP encoder layer running ToMe (merge between attention and MLP)."""
