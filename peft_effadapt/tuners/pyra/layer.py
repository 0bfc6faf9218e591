from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...merging import MergeSettings, MergingBlock, TokenMergingLayer, init_qkv_lora, qkv_delta_fn, qkv_delta_weights


def pyra_modulate(
    src: torch.Tensor,
    dst: torch.Tensor,
    w_r: torch.Tensor,
    w_d: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """PYRA's parallel yielding re-activation of the sources about to be merged (Xiong et al., ECCV 2024).

    `src`, `dst`: B×r×D size-weighted source tokens (rows in descending match score) and their destinations, or
    rows packed with trailing channels (``[s·x, s]`` from `merge_wavg`), which pass unchanged.
    ``M = LN(S + T)``; channel weight ``c = 2σ(W_rᵀ M)`` (B×1×D); token weight ``t = 2σ(M W_Dᵀ) − 1`` (B×r×1);
    returns ``S + (S ⊙ c) ⊙ t``. Written in few ops (host cost, issue 25): the two products as broadcast
    multiply-and-sum (4·r·D FLOPs per image, as the matmuls), ``2σ(z) − 1 = tanh(z / 2)``, and the factor 2 of `c`
    inside one ``addcmul``; equal to the matmul form within fp32 rounding.
    """
    if src.shape[1] != w_r.shape[0]:
        raise ValueError(f"PYRA W_r has {w_r.shape[0]} rows but {src.shape[1]} tokens are being merged.")
    dtype = src.dtype  # computed in the adapter's dtype (e.g. fp32 adapter on a bf16 model), returned in the input's
    src, dst = src.to(w_r.dtype), dst.to(w_r.dtype)
    width, extra = w_d.shape[-1], src.shape[-1] - w_d.shape[-1]
    m = F.layer_norm((src + dst)[..., :width], (width,), norm_weight, norm_bias, eps)
    channel = torch.sigmoid((m * w_r).sum(dim=1, keepdim=True))  # σ(W_rᵀ M), B×1×D (W_r: r×1)
    if extra:
        channel = F.pad(channel, (0, extra))  # weight 0: the trailing channels (the merged size) stay as they are
    token = torch.tanh(0.5 * (m * w_d).sum(dim=-1, keepdim=True))  # 2σ(M W_Dᵀ) − 1, B×r×1 (W_D: 1×D)
    return torch.addcmul(src, src * channel, token, value=2.0).to(dtype)


class PYRAModulation(nn.Module):
    """Inference copy of one layer's modulation, kept by ``merge_and_unload``: non-persistent buffers, so the merged
    model's state dict stays the base model's (save the adapter, not the merged model, to keep PYRA)."""

    def __init__(self, w_r, w_d, norm_weight, norm_bias, eps: float):
        super().__init__()
        for name, value in (("w_r", w_r), ("w_d", w_d), ("norm_weight", norm_weight), ("norm_bias", norm_bias)):
            self.register_buffer(name, value.detach().clone(), persistent=False)
        self.eps = eps

    def forward(self, src, dst):
        return pyra_modulate(src, dst, self.w_r, self.w_d, self.norm_weight, self.norm_bias, self.eps)


class PYRALayer(TokenMergingLayer):
    """Per adapter: LoRA on q/k/v (`pyra_lora_A`, `pyra_lora_B`) and, in layers that merge, W_r (`pyra_w_r`, r_l×1),
    W_D (`pyra_w_d`, 1×D) and the LayerNorm (`pyra_norm`)."""

    adapter_layer_names = ("pyra_lora_A", "pyra_lora_B", "pyra_w_r", "pyra_w_d", "pyra_norm")
    other_param_names = ("pyra_settings", "pyra_lora_dropout", "pyra_lora_scale", "pyra_lora_shared", "pyra_norm_eps")
    settings_attr = "pyra_settings"

    def __init__(self, base_layer, layout, layer, layer_name, context) -> None:
        super().__init__(base_layer, layout, layer, layer_name, context)
        self.pyra_lora_A = nn.ParameterDict({})
        self.pyra_lora_B = nn.ParameterDict({})
        self.pyra_w_r = nn.ParameterDict({})
        self.pyra_w_d = nn.ParameterDict({})
        self.pyra_norm = nn.ModuleDict({})
        self.pyra_lora_dropout = nn.ModuleDict({})
        self.pyra_lora_scale: dict[str, float] = {}
        self.pyra_lora_shared: dict[str, bool] = {}
        self.pyra_norm_eps: dict[str, float] = {}

    def update_layer(
        self,
        adapter_name: str,
        settings: MergeSettings,
        inference_mode: bool = False,
        lora_r: int = 8,
        lora_dropout: float = 0.1,
        lora_scale: float = 1.0,
        lora_shared_qkv_a: bool = True,
        eps: float = 1e-5,
        init_weights: bool = True,
    ) -> None:
        q_proj, _, _ = self._projections()
        d_in, d_out = q_proj.in_features, q_proj.out_features
        a, b = init_qkv_lora(d_in, d_out, lora_r, lora_shared_qkv_a, init_weights)
        self.pyra_lora_A[adapter_name], self.pyra_lora_B[adapter_name] = a, b
        self.pyra_lora_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.pyra_lora_scale[adapter_name] = float(lora_scale)
        self.pyra_lora_shared[adapter_name] = bool(lora_shared_qkv_a)
        self.pyra_norm_eps[adapter_name] = float(eps)
        if settings.r > 0:
            w_r = torch.empty(settings.r, 1)
            nn.init.kaiming_uniform_(w_r, a=math.sqrt(5))  # fan-in 1: U(-1, 1), as the official code
            w_d = torch.zeros(1, d_in)
            if not init_weights:
                nn.init.normal_(w_d, std=0.5)
            self.pyra_w_r[adapter_name] = nn.Parameter(w_r)
            self.pyra_w_d[adapter_name] = nn.Parameter(w_d)
            self.pyra_norm[adapter_name] = nn.LayerNorm(d_in, eps=eps)
        super().update_layer(adapter_name, settings, inference_mode=inference_mode)

    # -- LoRA ---------------------------------------------------------------------------------------------------
    def lora_delta_weights(self, adapter_name: str) -> list[torch.Tensor]:
        """ΔW_q, ΔW_k, ΔW_v (each D_out×D_in) = scale · B_i A_i."""
        return qkv_delta_weights(self.pyra_lora_A[adapter_name], self.pyra_lora_B[adapter_name],
                                 self.pyra_lora_scale[adapter_name], self.pyra_lora_shared[adapter_name])

    def qkv_delta_fn(self, adapter_name: str):
        return qkv_delta_fn(self.pyra_lora_A[adapter_name], self.pyra_lora_B[adapter_name],
                            self.pyra_lora_scale[adapter_name], self.pyra_lora_shared[adapter_name],
                            self.pyra_lora_dropout[adapter_name])

    def _fold(self, adapter_name: str, sign: int, safe_merge: bool = False) -> None:
        self._fold_into_projections(adapter_name, self.lora_delta_weights(adapter_name), sign, safe_merge, "PYRA")

    # -- modulation ---------------------------------------------------------------------------------------------
    def modulation_fn(self, adapter_name: str):
        if adapter_name not in self.pyra_w_r:
            return None
        w_r, w_d, norm = self.pyra_w_r[adapter_name], self.pyra_w_d[adapter_name], self.pyra_norm[adapter_name]
        return lambda src, dst: pyra_modulate(src, dst, w_r, w_d, norm.weight, norm.bias, norm.eps)

    def frozen_modulation(self, adapter_name: str):
        if adapter_name not in self.pyra_w_r:
            return None
        norm = self.pyra_norm[adapter_name]
        return PYRAModulation(
            self.pyra_w_r[adapter_name], self.pyra_w_d[adapter_name], norm.weight, norm.bias, norm.eps
        )


class PYRABlock(MergingBlock, PYRALayer):
    """A ViT / DeiT / CLIP encoder layer with LoRA on q/k/v, token merging and PYRA's re-activation."""
