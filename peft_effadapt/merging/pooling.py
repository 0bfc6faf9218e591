"""Attention pooling over merged tokens (SigLIP's head): the probe attends with ToMe's proportional attention.

SigLIP has no class token; its `SiglipMultiheadAttentionPoolingHead` pools every output token with one learned
probe query. After merging, a token stands for `s` patches, so the probe's softmax gets the same additive
``log(s)`` bias the encoder layers use (ToMe §3 "proportional attention"): with all sizes 1 it is the plain head, and
a merged token weighs what its patches weighed together when their keys are equal.
"""

from __future__ import annotations

from torch import nn

from .state import MergeContext


class SizeWeightedPooling:
    """Forward pre-hook (with kwargs) of an `nn.MultiheadAttention` pooling head: adds log(size) of the final merge
    state as a float `attn_mask` of shape (B·heads, queries, N). A callable object so that deep copies keep it."""

    def __init__(self, context: MergeContext):
        self.context = context

    def __call__(self, module: nn.MultiheadAttention, args, kwargs):
        size = self.context.final().size
        query, key = args[0], args[1]
        if size is None or kwargs.get("attn_mask") is not None or size.shape[1] != key.shape[1]:
            return None
        batch, queries = query.shape[0], query.shape[1]
        bias = size.log()[..., 0].to(query.dtype)  # B x N
        mask = bias[:, None, None, :].expand(batch, module.num_heads, queries, -1)
        return args, {**kwargs, "attn_mask": mask.reshape(batch * module.num_heads, queries, -1)}


def pooling_head(backbone: nn.Module) -> nn.MultiheadAttention | None:
    """The attention-pooling module of a vision backbone with one (SigLIP's `head.attention`), else None."""
    attention = getattr(getattr(backbone, "head", None), "attention", None)
    return attention if isinstance(attention, nn.MultiheadAttention) else None
