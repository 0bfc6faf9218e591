"""One pre-norm encoder layer (HF ViT / DeiT / CLIP) run from its own sub-modules with token merging between the
attention residual and the MLP (ToMe, Bolya et al. 2023, §3).

The attention keys (including any delta added to k) averaged over heads are the matching metric; proportional
attention is a B×1×1×N float bias, run by the kernel `attention.key_bias_kernel` picks (the model's eager or sdpa
interface; FlexAttention on request). The tensor algorithm itself lives in `matching`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.vit.modeling_vit import eager_attention_forward as vit_eager_attention

from ..validation.inputs import require
from .attention import flex_key_bias_attention, key_bias_kernel
from .families import BlockLayout, check_attention
from .matching import bipartite_soft_matching, log_size_bias, max_mergeable, merge_source, merge_wavg
from .state import MergeContext, MergeSettings, TokenState

QKVDelta = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def fire_forward_hooks(module: nn.Module, args: tuple, output) -> None:
    """Runs `module`'s plain forward hooks for a computation done from its sub-modules (transformers records
    `output_hidden_states` / `output_attentions` with such hooks)."""
    with_kwargs = getattr(module, "_forward_hooks_with_kwargs", {})
    for hook_id, hook in list(module._forward_hooks.items()):
        if not with_kwargs.get(hook_id, False):
            hook(module, args, output)


def block_attention(
    block: nn.Module,
    layout: BlockLayout,
    normed: torch.Tensor,
    attention_mask: torch.Tensor | None,
    kwargs: dict,
    qkv_delta: QKVDelta | None = None,
    method: str = "ToMe",
    layer_name: str = "",
    key_bias: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention of a pre-norm block from its own sub-modules, with an optional delta on q/k/v and an additive
    float `attention_mask` (a padding/causal mask, or with `key_bias` the B×1×1×N log-size bias of proportional
    attention, which goes to the kernel `attention.key_bias_kernel` picks). Returns (output after the
    out-projection, keys B×N×D incl. the delta). Attention weights, when requested (`output_attentions`), come from
    the eager math whatever the implementation. Fires the attention module's forward hooks as its own forward
    would."""
    attn = getattr(block, layout.attention)
    implementation = getattr(attn.config, "_attn_implementation", None) or "eager"
    check_attention(implementation, method, f"layer {layer_name}")
    batch, num_tokens, _ = normed.shape
    query = getattr(attn, layout.q_proj)(normed)
    key = getattr(attn, layout.k_proj)(normed)
    value = getattr(attn, layout.v_proj)(normed)
    if qkv_delta is not None:
        dq, dk, dv = qkv_delta(normed)
        query, key, value = query + dq, key + dk, value + dv
    hidden_shape = (batch, num_tokens, -1, attn.head_dim)
    query_states, key_states, value_states = (t.view(hidden_shape).transpose(1, 2) for t in (query, key, value))
    dropout = 0.0 if not attn.training else getattr(attn, layout.attention_dropout)
    scaling = getattr(attn, layout.scaling)
    wants_weights = bool(kwargs.get("output_attentions", getattr(attn.config, "output_attentions", False)))
    kernel = "eager" if wants_weights else implementation  # attention weights come from the eager math only
    if key_bias and attention_mask is not None:
        attention_mask = attention_mask.to(query.dtype)
        kernel = key_bias_kernel(implementation, dropout, wants_weights)
    if kernel == "flex":
        attn_output, attn_weights = flex_key_bias_attention(query_states, key_states, value_states, attention_mask,
                                                            scaling), None
    else:
        eager = getattr(sys.modules[type(attn).__module__], "eager_attention_forward", None) or vit_eager_attention
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(kernel, eager)
        attn_output, attn_weights = interface(attn, query_states, key_states, value_states, attention_mask,
                                              dropout=dropout, scaling=scaling, **kwargs)
    attn_output = attn_output.reshape(batch, num_tokens, -1).contiguous()
    attn_output = getattr(attn, layout.o_proj)(attn_output)
    fire_forward_hooks(attn, (normed,), (attn_output, attn_weights))
    return attn_output, key


def _attends_everywhere(mask: torch.Tensor) -> torch.Tensor:
    """0-d bool: the mask masks nothing (all True for a bool mask, all 0 for an additive float one)."""
    return mask.all() if mask.dtype == torch.bool else (mask == 0).all()


def check_no_padding_mask(attention_mask: torch.Tensor | None, method: str, layer_name: str) -> None:
    """Token merging changes the sequence length, so an attention/padding mask (built for the unmerged sequence)
    cannot be used; one that masks nothing (transformers materialises such a "no padding" mask under torch.compile)
    may be passed and is then ignored by the caller. A real mask fails `validation.require`."""
    if attention_mask is None:
        return
    message = (
        f"{method} cannot use an attention/padding mask (layer {layer_name} received one): the mask is built for the "
        "unmerged sequence and token merging changes the sequence length. Call the model without attention_mask "
        "(ViT/CLIP images need none)."
    )
    require(_attends_everywhere(attention_mask), message)


def residual_branch(block: nn.Module, layout: BlockLayout, branch: torch.Tensor, layer_scale: str | None):
    """What a residual branch adds, as the family's own layer does: dropout (ViT), or layer scale then drop-path
    (DINOv2)."""
    if layout.dropout is not None:
        branch = getattr(block, layout.dropout)(branch)
    if layer_scale is not None:
        branch = getattr(block, layer_scale)(branch)
    if layout.drop_path is not None:
        branch = getattr(block, layout.drop_path)(branch)
    return branch


def run_merging_block(
    block: nn.Module,
    layout: BlockLayout,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
    kwargs: dict,
    *,
    context: MergeContext,
    layer: int,
    layer_name: str,
    settings: MergeSettings,
    qkv_delta: QKVDelta | None = None,
    modulate=None,
    fire_block_hooks: bool = True,
    state: TokenState | None = None,
    block_input: torch.Tensor | None = None,
) -> torch.Tensor:
    """One pre-norm encoder layer with token merging between attention and MLP (ToMe, Bolya et al. 2023, §3).

    `state`: the token state of `hidden_states` when the caller already transformed the layer's input (TempMe's
    clip grouping); None reads slot `layer` of the context. `block_input`: what the layer's forward hooks see as its
    input (default `hidden_states`)."""
    attn = getattr(block, layout.attention)
    check_attention(getattr(attn.config, "_attn_implementation", None), settings.method, f"layer {layer_name}")
    check_no_padding_mask(attention_mask, settings.method, layer_name)
    attention_mask = None
    if state is None:
        state = context.read(layer, hidden_states, layer_name)
        if layer == 0 and state.num_tokens is None:
            context.write(0, TokenState(hidden_states.shape[1]))  # only records the input length; sizes stay None
    batch, num_tokens, _ = hidden_states.shape

    # attention, with the keys kept as the matching metric
    residual = hidden_states
    normed = getattr(block, layout.ln_before)(hidden_states)
    bias = log_size_bias(state.size) if settings.prop_attn else None
    attn_output, key = block_attention(
        block, layout, normed, bias, kwargs, qkv_delta, settings.method, layer_name, key_bias=True
    )
    head_dim = attn.head_dim
    hidden = residual_branch(block, layout, attn_output, layout.layer_scale_attention) + residual

    # merge between attention and MLP
    size, source = state.size, state.source
    r = settings.r
    if r > 0:
        allowed = max_mergeable(num_tokens, settings.protected)
        if r > allowed:
            if not settings.clamp:
                raise ValueError(
                    f"{settings.method} layer {layer} ({layer_name}) is scheduled to merge r={r} tokens, but only "
                    f"{num_tokens} tokens reach it ({settings.protected} protected): at most ({num_tokens} - "
                    f"{settings.protected}) // 2 = {allowed} can be merged. Use a smaller schedule or the input "
                    "resolution the schedule was made for."
                )
            r = allowed
    if r > 0:
        metric = key.view(batch, num_tokens, -1, head_dim).mean(dim=2)
        plan = bipartite_soft_matching(metric, r, settings.protected)
        if settings.trace_source:
            source = merge_source(plan, source, batch, device=hidden.device)
        hidden, size = merge_wavg(plan, hidden, size, modulate=modulate)

    # MLP
    residual = hidden
    out = getattr(block, layout.mlp)(getattr(block, layout.ln_after)(hidden))
    out = residual_branch(block, layout, out, layout.layer_scale_mlp) + residual
    context.write(layer + 1, TokenState(out.shape[1], size, source))
    if fire_block_hooks:
        fire_forward_hooks(block, (hidden_states if block_input is None else block_input, attention_mask), out)
    return out
