"""Proportional attention (ToMe §3) through the fastest kernel that takes a per-key bias.

``softmax(Q Kᵀ · scale + log s_j) V`` adds one bias per key (the log of the token's size). Which kernel runs it:

* ``"eager"``: transformers' eager attention (matmul, add, softmax, matmul), the reference. Used when the model's
  attention implementation is "eager" (the user's choice) or attention weights are requested (`output_attentions`).
* ``"sdpa"``: `torch.nn.functional.scaled_dot_product_attention` with the bias as a float B×1×1×N mask, through the
  model's sdpa interface. On the CPU its flash kernel takes the mask (measured: as fast as without a bias, eager and
  compiled; FlexAttention compiled for the CPU was 2-2.5x slower, benchmarks/proportional_attention.py); on CUDA
  the mask selects the memory-efficient kernel (flash takes no bias).
* ``"flex"``: FlexAttention (torch >= 2.5) with a `score_mod` adding the bias: a fused flash-style kernel generated
  by torch.compile. Chosen under torch.compile on CUDA; in eager mode FlexAttention runs an unfused reference, so
  it is never chosen there.

``"auto"`` (the default) picks as above; `use_key_bias_kernel` forces one (for benchmarks and tests). An older torch
without FlexAttention falls back to "sdpa".
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

try:
    from torch.nn.attention.flex_attention import flex_attention
except ImportError:  # torch < 2.5: no FlexAttention, "auto" never picks it
    flex_attention = None

KEY_BIAS_KERNELS = ("auto", "flex", "sdpa", "eager")
_preferred = "auto"


@contextmanager
def use_key_bias_kernel(kernel: str) -> Iterator[None]:
    """Runs proportional attention with `kernel` (one of KEY_BIAS_KERNELS) inside the block, e.g. to compare the
    kernels on a device. A compiled model is re-traced for another kernel (dynamo guards on the choice).

    Raises:
        ValueError: unknown kernel, or "flex" on a torch without FlexAttention.
    """
    global _preferred
    if kernel not in KEY_BIAS_KERNELS:
        raise ValueError(f"kernel must be one of {KEY_BIAS_KERNELS}, got {kernel!r}.")
    if kernel == "flex" and flex_attention is None:
        raise ValueError(f"kernel='flex' needs FlexAttention (torch >= 2.5); this is torch {torch.__version__}.")
    previous, _preferred = _preferred, kernel
    try:
        yield
    finally:
        _preferred = previous


def key_bias_kernel(implementation: str, device: torch.device, dropout: float, output_attentions: bool) -> str:
    """The kernel proportional attention runs with: "eager", "sdpa" or "flex" (see the module docstring)."""
    if implementation == "eager" or output_attentions:
        return "eager"
    if _preferred != "auto":
        return "sdpa" if _preferred == "flex" and dropout > 0 else _preferred  # FlexAttention has no dropout
    if flex_attention is not None and device.type == "cuda" and dropout == 0.0 and torch.compiler.is_compiling():
        return "flex"
    return "sdpa"


class AddKeyBias:
    """FlexAttention `score_mod`: adds ``bias[b, kv]`` (the B×1×1×N bias) to every query's score of key kv."""

    def __init__(self, bias: torch.Tensor):
        self.bias = bias

    def __call__(self, score, batch, head, q_idx, kv_idx):
        return score + self.bias[batch, 0, 0, kv_idx]


def flex_key_bias_attention(query, key, value, bias: torch.Tensor, scaling: float) -> torch.Tensor:
    """FlexAttention with the per-key bias; B×H×N×d in, B×N×H×d out (the layout of transformers' interfaces)."""
    out = flex_attention(query, key, value, score_mod=AddKeyBias(bias), scale=scaling)
    return out.transpose(1, 2)
