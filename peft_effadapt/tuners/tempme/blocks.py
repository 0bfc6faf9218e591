"""The bodies of TempMe's encoder blocks, written from the layer's own sub-modules (HF CLIPEncoderLayer layout).

Vision blocks carry their token state (sizes) through the shared `MergeContext` exactly like ToMe (slot l = input of
layer l, written once by layer l − 1), so gradient checkpointing re-runs see the same inputs. A ClipMe block changes
the batch dimension (S sequences -> S / g): the class-token count per sequence of every block is static (it follows
from the schedule), only the sizes travel in the context.
"""

from __future__ import annotations

import torch

from ...merging import (
    BlockLayout,
    MergeContext,
    MergeSettings,
    TokenState,
    bipartite_soft_matching,
    block_attention,
    fire_forward_hooks,
    group_sequences,
    merge_tokens,
    run_merging_block,
    unpack_weighted,
)
from .schedule import LayerPlan


def text_block_forward(block, layout: BlockLayout, hidden_states, attention_mask, kwargs, qkv_delta, layer_name: str,
                       fire_block_hooks: bool = True) -> torch.Tensor:
    """A plain pre-norm CLIP layer (causal/padding mask passed through) with a LoRA delta on q/k/v."""
    normed = getattr(block, layout.ln_before)(hidden_states)
    attn_output, _ = block_attention(block, layout, normed, attention_mask, kwargs, qkv_delta, "TempMe", layer_name)
    hidden = hidden_states + attn_output
    out = hidden + getattr(block, layout.mlp)(getattr(block, layout.ln_after)(hidden))
    if fire_block_hooks:
        fire_forward_hooks(block, (hidden_states, attention_mask), out)
    return out


def vision_block_forward(
    block,
    layout: BlockLayout,
    hidden_states: torch.Tensor,
    attention_mask,
    kwargs: dict,
    *,
    context: MergeContext,
    plan: LayerPlan,
    layer_name: str,
    prop_attn: bool,
    qkv_delta=None,
    clip_position: torch.Tensor | None = None,
    fire_block_hooks: bool = True,
) -> torch.Tensor:
    """One TempMe vision block (official module_tome_patch.py ToMeBlock.forward). ImgMe / intra blocks: attention, then ToMe on the keys with
    every class token protected, then MLP. ClipMe blocks first regroup g sequences into one, add the clip position
    embedding (after taking the matching metric), merge r_c tokens across the clip on the detached block-input
    hidden states, and then run the same body with r_i."""
    settings = MergeSettings(r=plan.r_intra, protected=plan.cls_out, prop_attn=prop_attn, method="TempMe")
    common = dict(context=context, layer=plan.layer, layer_name=layer_name, settings=settings, qkv_delta=qkv_delta,
                  fire_block_hooks=fire_block_hooks)
    if plan.kind != "clipme":
        return run_merging_block(block, layout, hidden_states, attention_mask, kwargs, **common)
    state = context.read(plan.layer, hidden_states, layer_name)
    sequences, num_tokens, _ = hidden_states.shape
    g, c = plan.group, plan.cls_in
    if sequences % plan.items_in:
        raise ValueError(
            f"TempMe layer {layer_name} expects the {plan.items_in} frames/clips of every video contiguous, got "
            f"{sequences} sequences: pass videos as (batch, num_frames, C, H, W) or (batch·num_frames, C, H, W)."
        )
    size = state.size if state.size is not None else hidden_states.new_ones(sequences, num_tokens, 1)
    if plan.r_cross > 0:
        x = hidden_states
        if clip_position is not None:
            x = x + clip_position.to(x.dtype).repeat(sequences // plan.items_in, 1)[:, None, :]
        # one regrouping moves the metric (the block input; the matching runs without gradient) and the packed
        # [x·s, s] of `pack_weighted` together
        grouped = group_sequences(torch.cat([hidden_states, x * size, size], dim=-1), g, c)
        metric, weighted = grouped.split([hidden_states.shape[-1], x.shape[-1] + 1], dim=-1)
        merge = bipartite_soft_matching(metric, plan.r_cross, protected=g * c)
        x, size = unpack_weighted(merge_tokens(merge, weighted, mode="sum"))
    else:
        x, size = group_sequences(hidden_states, g, c), group_sequences(size, g, c)
    return run_merging_block(block, layout, x, attention_mask, kwargs, state=TokenState(x.shape[1], size),
                             block_input=hidden_states, **common)
