"""LoRA on the q, k and v projections of one attention: the official form (one A shared by q, k, v; B of 3D×r) or
standard per-projection LoRA (A_q, A_k, A_v stored as one 3r×D tensor). Pure functions on the tensors."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def init_qkv_lora(d_in: int, d_out: int, r: int, shared: bool, init_weights: bool = True):
    """A ~ kaiming-uniform(a=√5) (= nn.Linear(D, r)'s init), B = 0 (random with init_weights=False, for tests)."""
    a = torch.empty(r if shared else 3 * r, d_in)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    b = torch.zeros(3 * d_out, r)
    if not init_weights:
        nn.init.normal_(b, std=0.2)
    return nn.Parameter(a), nn.Parameter(b)


def qkv_delta_weights(a: torch.Tensor, b: torch.Tensor, scale: float, shared: bool) -> list[torch.Tensor]:
    """ΔW_q, ΔW_k, ΔW_v (each D_out×D_in) = scale · B_i A_i."""
    a_parts = (a, a, a) if shared else a.chunk(3, dim=0)
    return [scale * (bi @ ai) for ai, bi in zip(a_parts, b.chunk(3, dim=0))]


def qkv_delta_fn(a: torch.Tensor, b: torch.Tensor, scale: float, shared: bool, dropout: nn.Module):
    """x -> (Δq, Δk, Δv); the shared form computes A·x once for all three."""

    def scaled(t: torch.Tensor) -> torch.Tensor:
        return t if scale == 1.0 else t * scale  # the official scale 1 costs no op

    def delta(x: torch.Tensor):
        z = F.linear(dropout(x.to(a.dtype)).reshape(-1, x.shape[-1]), a)  # on rows: each linear is one mm
        if shared:
            out = scaled(F.linear(z, b)).view(*x.shape[:-1], -1)
            return tuple(part.to(x.dtype) for part in out.chunk(3, dim=-1))
        return tuple(scaled(F.linear(zi, bi)).view(*x.shape[:-1], -1).to(x.dtype)
                     for zi, bi in zip(z.chunk(3, dim=-1), b.chunk(3, dim=0)))

    return delta
