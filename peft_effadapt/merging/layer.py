"""Tuner-layer base of the token-merging types: a whole HF encoder layer wrapped and run with token merging.

`TokenMergingLayer` is the peft `BaseTunerLayer` part (per-adapter settings, merge/unmerge, unload); `MergingBlock`
is the one nn.Module base of the concrete blocks (``class ToMeBlock(MergingBlock, ToMeLayer)``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .block import run_merging_block
from .families import BlockLayout
from .state import MergeContext, MergeSettings
from .swap import MergingBlockMixin, swap_block_class


class TokenMergingLayer(BaseTunerLayer):
    """Mixin for a tuner layer that wraps a whole HF encoder layer and runs it with token merging.

    Subclasses name their per-adapter containers with their own prefix (`settings_attr`, `adapter_layer_names`) and
    may add a delta on q/k/v (`qkv_delta_fn`), a modulation of the merged sources (`modulation_fn`), weights that
    fold into the base layer on merge (`_fold`) and their own block body (`run`, `merged_block`).
    """

    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ()
    settings_attr: str  # "<prefix>settings": per-adapter settings dict, listed in other_param_names too

    def __init__(
        self, base_layer: nn.Module, layout: BlockLayout, layer: int, layer_name: str, context: MergeContext
    ) -> None:
        self.base_layer = base_layer
        self.layout = layout
        self.layer_idx = layer
        self.layer_name = layer_name
        self.context = context
        # peft's tuner layers expose their widths; a whole encoder layer maps the D-wide residual stream to itself
        q_proj, _, _ = self._projections()
        self.in_features = q_proj.in_features
        self.out_features = getattr(getattr(base_layer, layout.attention), layout.o_proj).out_features
        setattr(self, self.settings_attr, {})
        self._disable_adapters = False
        self.merged_adapters = []
        # gradient checkpointing enabled before wrapping carries over (transformers sets it per layer)
        self.gradient_checkpointing = getattr(base_layer, "gradient_checkpointing", False)
        if hasattr(base_layer, "_gradient_checkpointing_func"):
            self._gradient_checkpointing_func = base_layer._gradient_checkpointing_func

    @property
    def merge_settings(self) -> dict:
        return getattr(self, self.settings_attr)

    def update_layer(self, adapter_name: str, settings, inference_mode: bool = False, **kwargs) -> None:
        self.merge_settings[adapter_name] = settings
        self._move_adapter_to_base_device(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _move_adapter_to_base_device(self, adapter_name: str) -> None:
        reference = next(self.base_layer.parameters(), None)
        if reference is None:
            return
        for attr in self.adapter_layer_names:
            container = getattr(self, attr)
            if adapter_name in container:
                item = container[adapter_name]
                if any(t.is_meta for t in (item.parameters() if isinstance(item, nn.Module) else [item])):
                    continue  # low_cpu_mem_usage: created on the meta device, the loader assigns the real tensors
                if isinstance(item, nn.Module):
                    item.to(device=reference.device, dtype=reference.dtype)
                else:
                    container[adapter_name] = nn.Parameter(
                        item.data.to(device=reference.device, dtype=reference.dtype), requires_grad=item.requires_grad
                    )

    def _projections(self) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        attn = getattr(self.base_layer, self.layout.attention)
        return tuple(getattr(attn, n) for n in (self.layout.q_proj, self.layout.k_proj, self.layout.v_proj))

    def _fold_into_projections(
        self, adapter_name: str, deltas: Sequence[torch.Tensor], sign: int, safe_merge: bool, method: str
    ) -> None:
        """Adds (sign=+1) or removes (-1) ΔW_q, ΔW_k, ΔW_v in the base layer's q/k/v weights (fp32 arithmetic)."""
        with torch.no_grad():
            if safe_merge and not all(torch.isfinite(d).all() for d in deltas):
                raise ValueError(
                    f"NaNs or infs in the LoRA of {method} adapter '{adapter_name}' ({self.layer_name}); not merged."
                )
            for proj, delta in zip(self._projections(), deltas):
                weight = proj.weight
                weight.data = (weight.data.float() + sign * delta.float().to(weight.device)).to(weight.dtype)

    # -- hooks for subclasses -----------------------------------------------------------------------------------
    def qkv_delta_fn(self, adapter_name: str) -> Callable | None:
        return None

    def modulation_fn(self, adapter_name: str) -> Callable | None:
        return None

    def frozen_modulation(self, adapter_name: str) -> nn.Module | None:
        """A parameter-free copy of the modulation for a merged (unloaded) block, or None."""
        return None

    def _fold(self, adapter_name: str, sign: int, safe_merge: bool = False) -> None:
        """Adds (sign=+1) or removes (-1) the adapter's weight deltas in the base layer. ToMe has none."""

    def run(self, adapter_name: str, hidden_states, attention_mask, kwargs: dict, qkv_delta) -> torch.Tensor:
        """The block body of `adapter_name` (ToMe's; TempMe overrides it)."""
        return run_merging_block(
            self.base_layer,
            self.layout,
            hidden_states,
            attention_mask,
            kwargs,
            context=self.context,
            layer=self.layer_idx,
            layer_name=self.layer_name,
            settings=self.merge_settings[adapter_name],
            qkv_delta=qkv_delta,
            modulate=self.modulation_fn(adapter_name),
        )

    def merged_block(self, adapter_name: str) -> nn.Module:
        """The base layer converted in place into a layer that keeps running `adapter_name`'s merging (weights
        already folded); same class family and state-dict keys."""
        return self._swap_base_layer(
            MergingBlockMixin, adapter_name, token_merge_modulation=self.frozen_modulation(adapter_name)
        )

    def _swap_base_layer(self, mixin: type, adapter_name: str, **modules) -> nn.Module:
        """`swap_block_class` of the base layer with this layer's place in the model and `adapter_name`'s settings
        (``_token_merge_*`` attributes) plus `modules` (parameter-free children the merged forward reads)."""
        return swap_block_class(
            self.base_layer,
            mixin,
            _token_merge_layout=self.layout,
            _token_merge_context=self.context,
            _token_merge_layer=self.layer_idx,
            _token_merge_name=self.layer_name,
            _token_merge_settings=self.merge_settings[adapter_name],
            **modules,
        )

    # -- forward ------------------------------------------------------------------------------------------------
    def _active_merging_adapter(self) -> str | None:
        names = [name for name in self.active_adapters if name in self.merge_settings]
        if len(names) > 1:
            raise ValueError(
                f"Layer {self.layer_name} has several active token-merging adapters {names}; only one schedule can run "
                "at a time. Activate one adapter with set_adapter()."
            )
        return names[0] if names else None

    def merging_forward(self, hidden_states: torch.Tensor, attention_mask=None, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(hidden_states, attention_mask, **kwargs)
        name = self._active_merging_adapter()
        if name is None:
            return self.base_layer(hidden_states, attention_mask, **kwargs)
        return self.run(name, hidden_states, attention_mask, kwargs, None if self.merged else self.qkv_delta_fn(name))

    # -- merging ------------------------------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for name in adapter_names:
            if name in self.merge_settings:
                self._fold(name, +1, safe_merge=safe_merge)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            self._fold(self.merged_adapters.pop(), -1)

    def unload_and_optionally_merge_module(
        self, merge: bool, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """peft's unload hook. merge=False: the plain base layer. merge=True: weight deltas folded in, and the base
        layer converted in place into a token-merging layer (same class family, same state-dict keys) that keeps
        merging with the schedule of the merged adapter."""
        if not merge:
            return self.base_layer
        self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        names = [n for n in (adapter_names or self.active_adapters) if n in self.merge_settings]
        return self.merged_block(names[0]) if names else self.base_layer


class MergingBlock(GradientCheckpointingLayer):
    """The nn.Module base of every concrete token-merging block: ``class XBlock(MergingBlock, XLayer)`` wraps one
    encoder layer, initialises the `XLayer` part and adds the first adapter (extra keyword arguments go to
    `XLayer.update_layer`)."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        layout: BlockLayout,
        layer: int,
        layer_name: str,
        context: MergeContext,
        settings: MergeSettings,
        **kwargs,
    ) -> None:
        GradientCheckpointingLayer.__init__(self)
        layer_cls = next(
            c for c in type(self).__mro__ if issubclass(c, TokenMergingLayer) and not issubclass(c, MergingBlock)
        )
        layer_cls.__init__(self, base_layer, layout, layer, layer_name, context)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, settings, **kwargs)

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        return self.merging_forward(hidden_states, attention_mask, **kwargs)

    def __repr__(self) -> str:
        return f"{self.settings_attr.removesuffix('_settings')}." + super().__repr__()
