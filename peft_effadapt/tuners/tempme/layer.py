from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from ..tome.blocks import BlockLayout, MergeContext
from ..tome.layer import TokenMergingLayer
from .blocks import text_block_forward, vision_block_forward
from .lora import init_qkv_lora, qkv_delta_fn, qkv_delta_weights
from .schedule import LayerPlan


@dataclass(frozen=True)
class TempMeSettings:
    """Per adapter and layer: the vision block's plan (None for a text layer) and the LoRA form."""

    plan: LayerPlan | None
    prop_attn: bool = True
    lora_r: int = 8
    lora_scale: float = 1.0
    lora_shared_qkv_a: bool = True
    clip_position_embedding: bool = True


class TempMeLayer(TokenMergingLayer):
    """Per adapter: LoRA on q/k/v (`tempme_lora_A` r×D or 3r×D, `tempme_lora_B` 3D×r) and, in ClipMe layers, the
    clip position embedding `tempme_clip_pos` (frames/clips entering the layer × D)."""

    adapter_layer_names = ("tempme_lora_A", "tempme_lora_B", "tempme_clip_pos")
    other_param_names = ("tempme_settings", "tempme_lora_dropout", "tempme_frames")
    settings_attr = "tempme_settings"

    def __init__(self, base_layer, layout, layer, layer_name, context) -> None:
        super().__init__(base_layer, layout, layer, layer_name, context)
        self.tempme_lora_A = nn.ParameterDict({})
        self.tempme_lora_B = nn.ParameterDict({})
        self.tempme_clip_pos = nn.ParameterDict({})
        self.tempme_lora_dropout = nn.ModuleDict({})
        self.tempme_frames: dict[str, int] = {}  # frames per video of each adapter (set by the tuner)

    def _projections(self) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        attn = getattr(self.base_layer, self.layout.attention)
        return tuple(getattr(attn, n) for n in (self.layout.q_proj, self.layout.k_proj, self.layout.v_proj))

    def update_layer(self, adapter_name: str, settings: TempMeSettings, inference_mode: bool = False,
                     lora_dropout: float = 0.0, init_weights: bool = True) -> None:
        q_proj = self._projections()[0]
        if settings.lora_r > 0:
            a, b = init_qkv_lora(q_proj.in_features, q_proj.out_features, settings.lora_r,
                                 settings.lora_shared_qkv_a, init_weights)
            self.tempme_lora_A[adapter_name], self.tempme_lora_B[adapter_name] = a, b
            self.tempme_lora_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        plan = settings.plan
        if plan is not None and plan.kind == "clipme" and settings.clip_position_embedding:
            pos = torch.zeros(plan.items_in, q_proj.in_features)
            if not init_weights:
                nn.init.normal_(pos, std=0.1)
            self.tempme_clip_pos[adapter_name] = nn.Parameter(pos)
        super().update_layer(adapter_name, settings, inference_mode=inference_mode)

    # -- LoRA ---------------------------------------------------------------------------------------------------
    def lora_delta_weights(self, adapter_name: str) -> list[torch.Tensor]:
        settings = self.merge_settings[adapter_name]
        return qkv_delta_weights(self.tempme_lora_A[adapter_name], self.tempme_lora_B[adapter_name],
                                 settings.lora_scale, settings.lora_shared_qkv_a)

    def qkv_delta_fn(self, adapter_name: str):
        if adapter_name not in self.tempme_lora_A:
            return None
        settings = self.merge_settings[adapter_name]
        return qkv_delta_fn(self.tempme_lora_A[adapter_name], self.tempme_lora_B[adapter_name], settings.lora_scale,
                            settings.lora_shared_qkv_a, self.tempme_lora_dropout[adapter_name])

    def _fold(self, adapter_name: str, sign: int, safe_merge: bool = False) -> None:
        if adapter_name not in self.tempme_lora_A:
            return
        with torch.no_grad():
            deltas = self.lora_delta_weights(adapter_name)
            if safe_merge and not all(torch.isfinite(d).all() for d in deltas):
                raise ValueError(f"NaNs or infs in the LoRA of TempMe adapter '{adapter_name}' ({self.layer_name}).")
            for proj, delta in zip(self._projections(), deltas):
                weight = proj.weight
                weight.data = (weight.data.float() + sign * delta.float().to(weight.device)).to(weight.dtype)

    # -- forward ------------------------------------------------------------------------------------------------
    def run(self, adapter_name: str, hidden_states, attention_mask, kwargs, qkv_delta) -> torch.Tensor:
        settings = self.merge_settings[adapter_name]
        if settings.plan is None:
            return text_block_forward(self.base_layer, self.layout, hidden_states, attention_mask, kwargs, qkv_delta,
                                      self.layer_name)
        return vision_block_forward(
            self.base_layer, self.layout, hidden_states, attention_mask, kwargs, context=self.context,
            plan=settings.plan, layer_name=self.layer_name, prop_attn=settings.prop_attn, qkv_delta=qkv_delta,
            clip_position=self.tempme_clip_pos.get(adapter_name, None),
        )

    def merging_forward(self, hidden_states, attention_mask=None, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(hidden_states, attention_mask, **kwargs)
        name = self._active_merging_adapter()
        if name is None:
            return self.base_layer(hidden_states, attention_mask, **kwargs)
        qkv_delta = None if self.merged else self.qkv_delta_fn(name)
        return self.run(name, hidden_states, attention_mask, kwargs, qkv_delta)

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool = False,
                                           adapter_names: list[str] | None = None) -> nn.Module:
        """merge=False: the plain base layer. merge=True: LoRA folded into q/k/v; a vision layer becomes a base-class
        layer that keeps running the adapter's TempMe block (position embedding as a non-persistent buffer)."""
        if not merge:
            return self.base_layer
        self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        names = [n for n in (adapter_names or self.active_adapters) if n in self.merge_settings]
        if not names or self.merge_settings[names[0]].plan is None:
            return self.base_layer
        name = names[0]
        settings = self.merge_settings[name]
        position = self.tempme_clip_pos.get(name, None)
        return make_merged_block(self.base_layer, self.layout, self.context, self.layer_name, settings, position)


class TempMeBlock(GradientCheckpointingLayer, TempMeLayer):
    """A CLIP encoder layer running TempMe (vision) or LoRA only (text)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, layout: BlockLayout, layer: int, layer_name: str,
                 context: MergeContext, settings: TempMeSettings, **kwargs) -> None:
        GradientCheckpointingLayer.__init__(self)
        TempMeLayer.__init__(self, base_layer, layout, layer, layer_name, context)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, settings, **kwargs)

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        return self.merging_forward(hidden_states, attention_mask, **kwargs)

    def __repr__(self) -> str:
        return "tempme." + super().__repr__()


# -- merged (unloaded) vision blocks ----------------------------------------------------------------------------------
class FrozenClipPosition(nn.Module):
    """The clip position embedding of a merged block: a non-persistent buffer, so the state dict stays the base's."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.register_buffer("value", value.detach().clone(), persistent=False)


class TempMeMergedMixin:
    def forward(self, hidden_states, attention_mask=None, **kwargs):
        frozen = getattr(self, "tempme_frozen_position", None)
        return vision_block_forward(
            self, self._tempme_layout, hidden_states, attention_mask, kwargs, context=self._tempme_context,
            plan=self._tempme_settings.plan, layer_name=self._tempme_name, prop_attn=self._tempme_settings.prop_attn,
            clip_position=None if frozen is None else frozen.value, fire_block_hooks=False,
        )


_MERGED: dict[type, type] = {}


def make_merged_block(block: nn.Module, layout, context, layer_name: str, settings: TempMeSettings,
                      position: torch.Tensor | None) -> nn.Module:
    base_cls = type(block)
    if base_cls not in _MERGED:
        cls = type(f"TempMe{base_cls.__name__}", (TempMeMergedMixin, base_cls), {"__module__": __name__})
        _MERGED[base_cls] = cls
        globals()[cls.__name__] = cls
    block.__class__ = _MERGED[base_cls]
    block._tempme_layout, block._tempme_context = layout, context
    block._tempme_name, block._tempme_settings = layer_name, settings
    if position is not None:
        block.tempme_frozen_position = FrozenClipPosition(position)
    return block
