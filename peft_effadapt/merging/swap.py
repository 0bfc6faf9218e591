"""The one class swap used by ``merge_and_unload`` of every token-merging type: a plain HF encoder layer becomes, in
place, an instance of a subclass of its own class whose forward runs the merging body. Parameters and state-dict
keys stay the base layer's; what the body needs rides along as attributes (modules with non-persistent buffers only,
so the state dict is unchanged).
"""

from __future__ import annotations

from torch import nn

from .block import run_merging_block

_SWAPPED: dict[tuple[type, type], type] = {}


def swapped_class(mixin: type, base_cls: type) -> type:
    """``<mixin.class_prefix><base_cls name>(mixin, base_cls)``, created once per pair and importable from this
    module by its name (so a merged model can be deep-copied and pickled)."""
    cls = _SWAPPED.get((mixin, base_cls))
    if cls is None:
        name = f"{mixin.class_prefix}{base_cls.__name__}"
        cls = type(name, (mixin, base_cls), {"__module__": __name__, "__qualname__": name})
        globals()[name] = cls
        _SWAPPED[(mixin, base_cls)] = cls
    return cls


def original_class(cls: type) -> type:
    """The HF class a (possibly already swapped) block was made from."""
    return next((base for (_, base), swapped in _SWAPPED.items() if swapped is cls), cls)


def swap_block_class(block: nn.Module, mixin: type, **attributes) -> nn.Module:
    """Converts `block` in place into ``swapped_class(mixin, its HF class)`` and sets `attributes` on it (a module
    value becomes a child). A block swapped before is swapped again from its original class."""
    block.__class__ = swapped_class(mixin, original_class(type(block)))
    for name, value in attributes.items():
        if value is not None:
            setattr(block, name, value)
    return block


class MergingBlockMixin:
    """Forward of a merged ToMe / PYRA layer: the merging body with the adapter's settings and, for PYRA, the frozen
    modulation (`token_merge_modulation`)."""

    class_prefix = "TokenMerging"

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        return run_merging_block(
            self,
            self._token_merge_layout,
            hidden_states,
            attention_mask,
            kwargs,
            context=self._token_merge_context,
            layer=self._token_merge_layer,
            layer_name=self._token_merge_name,
            settings=self._token_merge_settings,
            modulate=getattr(self, "token_merge_modulation", None),
            fire_block_hooks=False,
        )
