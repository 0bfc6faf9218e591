from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...merging import MergingBlock, TokenMergingLayer, init_qkv_lora, qkv_delta_fn, qkv_delta_weights
from .blocks import text_block_forward, vision_block_forward
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
        if adapter_name in self.tempme_lora_A:
            self._fold_into_projections(adapter_name, self.lora_delta_weights(adapter_name), sign, safe_merge, "TempMe")

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

    def merged_block(self, adapter_name: str) -> nn.Module:
        """A vision layer becomes a base-class layer that keeps running the adapter's TempMe block (position embedding
        as a non-persistent buffer); a text layer is the plain layer (its LoRA is folded)."""
        settings = self.merge_settings[adapter_name]
        if settings.plan is None:
            return self.base_layer
        position = self.tempme_clip_pos.get(adapter_name, None)
        frozen = None if position is None else FrozenClipPosition(position)
        return self._swap_base_layer(TempMeMergedMixin, adapter_name, token_merge_position=frozen)


class TempMeBlock(MergingBlock, TempMeLayer):
    """A CLIP encoder layer running TempMe (vision) or LoRA only (text)."""


# -- merged (unloaded) vision blocks ----------------------------------------------------------------------------------
class FrozenClipPosition(nn.Module):
    """The clip position embedding of a merged block: a non-persistent buffer, so the state dict stays the base's."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.register_buffer("value", value.detach().clone(), persistent=False)


class TempMeMergedMixin:
    """Forward of a merged TempMe vision layer (see `swap_block_class`)."""

    class_prefix = "TempMe"

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        frozen = getattr(self, "token_merge_position", None)
        settings = self._token_merge_settings
        return vision_block_forward(
            self, self._token_merge_layout, hidden_states, attention_mask, kwargs, context=self._token_merge_context,
            plan=settings.plan, layer_name=self._token_merge_name, prop_attn=settings.prop_attn,
            clip_position=None if frozen is None else frozen.value, fire_block_hooks=False,
        )
