from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .blocks import BlockLayout, MergeContext, MergeSettings, make_merging_block, run_merging_block


class TokenMergingLayer(BaseTunerLayer):
    """Mixin for a tuner layer that wraps a whole HF encoder layer and runs it with token merging.

    Subclasses name their per-adapter containers with their own prefix (`settings_attr`, `adapter_layer_names`) and
    may add a delta on q/k/v (`qkv_delta_fn`), a modulation of the merged sources (`modulation_fn`) and weights that
    fold into the base layer on merge (`_fold`).
    """

    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ("tome_settings",)
    settings_attr = "tome_settings"

    def __init__(
        self, base_layer: nn.Module, layout: BlockLayout, layer: int, layer_name: str, context: MergeContext
    ) -> None:
        self.base_layer = base_layer
        self.layout = layout
        self.layer_idx = layer
        self.layer_name = layer_name
        self.context = context
        setattr(self, self.settings_attr, {})
        self._disable_adapters = False
        self.merged_adapters = []
        # gradient checkpointing enabled before wrapping carries over (transformers sets it per layer)
        self.gradient_checkpointing = getattr(base_layer, "gradient_checkpointing", False)
        if hasattr(base_layer, "_gradient_checkpointing_func"):
            self._gradient_checkpointing_func = base_layer._gradient_checkpointing_func

    @property
    def merge_settings(self) -> dict[str, MergeSettings]:
        return getattr(self, self.settings_attr)

    def update_layer(self, adapter_name: str, settings: MergeSettings, inference_mode: bool = False, **kwargs) -> None:
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
        return run_merging_block(
            self.base_layer,
            self.layout,
            hidden_states,
            attention_mask,
            kwargs,
            context=self.context,
            layer=self.layer_idx,
            layer_name=self.layer_name,
            settings=self.merge_settings[name],
            qkv_delta=None if self.merged else self.qkv_delta_fn(name),
            modulate=self.modulation_fn(name),
        )

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
        if not names:
            return self.base_layer
        name = names[0]
        return make_merging_block(
            self.base_layer,
            self.layout,
            self.context,
            self.layer_idx,
            self.layer_name,
            self.merge_settings[name],
            modulation=self.frozen_modulation(name),
        )


class ToMeLayer(TokenMergingLayer):
    """ToMe has no tensors: per adapter only its `MergeSettings` (r of this layer, protected tokens, ...)."""

    adapter_layer_names = ()
    other_param_names = ("tome_settings",)
    settings_attr = "tome_settings"


class ToMeBlock(GradientCheckpointingLayer, ToMeLayer):
    """A ViT / DeiT / CLIP encoder layer running ToMe (merge between attention and MLP)."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        layout: BlockLayout,
        layer: int,
        layer_name: str,
        context: MergeContext,
        settings: MergeSettings,
    ) -> None:
        GradientCheckpointingLayer.__init__(self)
        ToMeLayer.__init__(self, base_layer, layout, layer, layer_name, context)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, settings)

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        return self.merging_forward(hidden_states, attention_mask, **kwargs)

    def __repr__(self) -> str:
        return "tome." + super().__repr__()
