"""Token merging inside Hugging Face ViT / DeiT / CLIP-vision encoder layers.

The pre-norm block body is re-implemented from the layer's own sub-modules so that the merge sits between the
attention residual and the MLP, with the attention keys (including any delta added to k) averaged over heads as the
matching metric, and proportional attention passed as a B×1×1×N float ``attention_mask`` through the model's
attention interface (eager or sdpa). This module is shared by the ToMe and PYRA tuners (PYRA = LoRA + ToMe + a
modulation of the merged sources); the tensor algorithm itself lives in `peft_effadapt.merging`.

Per-forward state (token sizes, optional source map) lives in a `MergeContext`: a forward pre-hook on the backbone
resets it, layer l reads its input state from slot l and writes slot l+1, and never touches earlier slots, so a
layer re-run by gradient checkpointing sees exactly the inputs of its first run.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.clip.modeling_clip import CLIPEncoderLayer
from transformers.models.deit.modeling_deit import DeiTLayer
from transformers.models.vit.modeling_vit import ViTLayer
from transformers.models.vit.modeling_vit import eager_attention_forward as vit_eager_attention

from ...merging import bipartite_soft_matching, log_size_bias, max_mergeable, merge_source, merge_wavg

SUPPORTED_ATTENTION = ("eager", "sdpa")


@dataclass(frozen=True)
class BlockLayout:
    """Sub-module names of one pre-norm encoder-layer family."""

    ln_before: str
    ln_after: str
    attention: str
    q_proj: str
    k_proj: str
    v_proj: str
    o_proj: str
    mlp: str
    dropout: str | None
    scaling: str
    attention_dropout: str


VIT_LAYOUT = BlockLayout(
    "layernorm_before", "layernorm_after", "attention", "q_proj", "k_proj", "v_proj", "o_proj", "mlp", "dropout",
    "scaling", "attention_dropout",
)
CLIP_LAYOUT = BlockLayout(
    "layer_norm1", "layer_norm2", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "mlp", None, "scale",
    "dropout",
)
LAYOUTS: dict[type, BlockLayout] = {ViTLayer: VIT_LAYOUT, DeiTLayer: VIT_LAYOUT, CLIPEncoderLayer: CLIP_LAYOUT}


def layout_of(block: nn.Module) -> BlockLayout | None:
    for cls in type(block).__mro__:
        if cls in LAYOUTS:
            return LAYOUTS[cls]
    return None


# -- supported models -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelFamily:
    backbone: str  # module path of the model whose forward runs the embeddings and the encoder layers
    layers_regex: str  # default target_modules: every encoder layer of the (vision) tower
    protected: int  # leading tokens that are never merged (CLS, DeiT distillation token)
    vision_config: str | None  # attribute of model.config holding the vision config (None: model.config itself)


SUPPORTED_MODELS: dict[str, ModelFamily] = {
    "ViTModel": ModelFamily("", r"layers\.\d+", 1, None),
    "ViTForImageClassification": ModelFamily("vit", r"vit\.layers\.\d+", 1, None),
    "DeiTModel": ModelFamily("", r"layers\.\d+", 2, None),
    "DeiTForImageClassification": ModelFamily("deit", r"deit\.layers\.\d+", 2, None),
    "DeiTForImageClassificationWithTeacher": ModelFamily("deit", r"deit\.layers\.\d+", 2, None),
    "CLIPVisionModel": ModelFamily("", r"encoder\.layers\.\d+", 1, None),
    "CLIPVisionModelWithProjection": ModelFamily(
        "vision_model", r"vision_model\.encoder\.layers\.\d+", 1, None
    ),
    "CLIPModel": ModelFamily("vision_model", r"vision_model\.encoder\.layers\.\d+", 1, "vision_config"),
}
_LAYER_INDEX = re.compile(r"layers\.(\d+)$")


def model_family(model: nn.Module, method: str) -> ModelFamily:
    family = SUPPORTED_MODELS.get(type(model).__name__)
    if family is None:
        raise ValueError(
            f"{method} supports only {', '.join(SUPPORTED_MODELS)} (token merging needs a pre-norm ViT-style encoder "
            f"whose head reads the class token); got {type(model).__name__}."
        )
    return family


def vision_config_of(model: nn.Module, family: ModelFamily):
    config = model.config
    return getattr(config, family.vision_config) if family.vision_config else config


def initial_token_count(model: nn.Module, family: ModelFamily) -> int:
    config = vision_config_of(model, family)
    return (config.image_size // config.patch_size) ** 2 + family.protected


def layer_index(name: str) -> int:
    match = _LAYER_INDEX.search(name)
    if match is None:
        raise ValueError(f"cannot read a layer index from module name {name!r} (expected '...layers.<i>').")
    return int(match.group(1))


def backbone_name(layer_name: str) -> str:
    """'vit.layers.3' -> 'vit'; 'vision_model.encoder.layers.0' -> 'vision_model'; 'layers.1' -> ''."""
    return re.sub(r"(^|\.)(encoder\.)?layers\.\d+$", "", layer_name)


# -- per-forward state ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenState:
    """What layer l receives with its hidden states: the token count, sizes (B×N×1 or None = all ones) and the
    source map (B×N×N_0 or None = identity / not traced)."""

    num_tokens: int | None = None
    size: torch.Tensor | None = None
    source: torch.Tensor | None = None


@dataclass
class MergeContext:
    """Slots of token state for one forward: slot l is the input of layer l."""

    slots: dict[int, TokenState] = field(default_factory=lambda: {0: TokenState()})

    def reset(self) -> None:
        self.slots = {0: TokenState()}

    def read(self, layer: int, hidden_states: torch.Tensor, layer_name: str) -> TokenState:
        state = self.slots.get(layer)
        if state is None:
            if layer == 0 or not any(k > 0 for k in self.slots):
                return TokenState()  # nothing has been merged before this layer in this forward
            raise ValueError(
                f"token-merging layer {layer} ({layer_name}) ran without the state of layer {layer - 1}; merging "
                "layers must run in order inside one forward of the model."
            )
        if state.num_tokens is not None and state.num_tokens != hidden_states.shape[1]:
            raise ValueError(
                f"token-merging layer {layer} ({layer_name}) received {hidden_states.shape[1]} tokens, but the merge "
                f"state of this forward says {state.num_tokens}. Run the layers through the model's forward (the "
                "state is reset by a hook on the backbone); with gradient checkpointing, run backward before the next "
                "forward."
            )
        return state

    def write(self, layer: int, state: TokenState) -> None:
        self.slots[layer] = state

    def final(self) -> TokenState:
        return self.slots[max(self.slots)]

    def token_counts(self) -> list[int | None]:
        return [self.slots[k].num_tokens for k in sorted(self.slots)]


class ResetMergeState:
    """Forward pre-hook of the backbone: a fresh state for every forward. A callable object (not a closure) so that
    deep-copying the model copies the hook together with the context its layers use."""

    def __init__(self, context: MergeContext):
        self.context = context

    def __call__(self, module, args):
        self.context.reset()


@dataclass(frozen=True)
class MergeSettings:
    """Per adapter and layer: how many tokens to merge and how."""

    r: int
    protected: int = 1
    prop_attn: bool = True
    trace_source: bool = False
    clamp: bool = False  # False: r above the 50 % rule raises; True: clamp like the reference ToMe
    method: str = "ToMe"


# -- the block body ---------------------------------------------------------------------------------------------------
QKVDelta = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _fire_forward_hooks(module: nn.Module, args: tuple, output) -> None:
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
    cast_mask: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention of a pre-norm block from its own sub-modules, with an optional delta on q/k/v and an additive
    float `attention_mask` (a padding/causal mask or the log-size bias). Returns (output after the out-projection,
    keys B×N×D incl. the delta). Fires the attention module's forward hooks as its own forward would."""
    attn = getattr(block, layout.attention)
    implementation = getattr(attn.config, "_attn_implementation", None) or "eager"
    if implementation not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"{method} passes proportional attention as an additive float mask, which only the 'eager' and "
            f"'sdpa' attention implementations take; layer {layer_name} uses {implementation!r}. Load the model with "
            "attn_implementation='sdpa' (or 'eager'), or call model.set_attn_implementation('sdpa')."
        )
    batch, num_tokens, _ = normed.shape
    query = getattr(attn, layout.q_proj)(normed)
    key = getattr(attn, layout.k_proj)(normed)
    value = getattr(attn, layout.v_proj)(normed)
    if qkv_delta is not None:
        dq, dk, dv = qkv_delta(normed)
        query, key, value = query + dq, key + dk, value + dv
    hidden_shape = (batch, num_tokens, -1, attn.head_dim)
    if cast_mask and attention_mask is not None:
        attention_mask = attention_mask.to(query.dtype)
    eager = getattr(sys.modules[type(attn).__module__], "eager_attention_forward", None) or vit_eager_attention
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager)
    attn_output, attn_weights = interface(
        attn,
        query.view(hidden_shape).transpose(1, 2),
        key.view(hidden_shape).transpose(1, 2),
        value.view(hidden_shape).transpose(1, 2),
        attention_mask,
        dropout=0.0 if not attn.training else getattr(attn, layout.attention_dropout),
        scaling=getattr(attn, layout.scaling),
        **kwargs,
    )
    attn_output = attn_output.reshape(batch, num_tokens, -1).contiguous()
    attn_output = getattr(attn, layout.o_proj)(attn_output)
    _fire_forward_hooks(attn, (normed,), (attn_output, attn_weights))
    return attn_output, key


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
    implementation = getattr(attn.config, "_attn_implementation", None) or "eager"
    if implementation not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"{settings.method} passes proportional attention as an additive float mask, which only the 'eager' and "
            f"'sdpa' attention implementations take; layer {layer_name} uses {implementation!r}. Load the model with "
            "attn_implementation='sdpa' (or 'eager'), or call model.set_attn_implementation('sdpa')."
        )
    if attention_mask is not None:
        raise ValueError(
            f"{settings.method} cannot use an attention/padding mask (layer {layer_name} received one): the mask is "
            "built for the unmerged sequence and token merging changes the sequence length. Call the model without "
            "attention_mask (ViT/CLIP images need none)."
        )
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
        block, layout, normed, bias, kwargs, qkv_delta, settings.method, layer_name, cast_mask=True
    )
    head_dim = attn.head_dim
    if layout.dropout is not None:
        attn_output = getattr(block, layout.dropout)(attn_output)
    hidden = attn_output + residual

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
    if layout.dropout is not None:
        out = getattr(block, layout.dropout)(out)
    out = out + residual
    context.write(layer + 1, TokenState(out.shape[1], size, source))
    if fire_block_hooks:
        _fire_forward_hooks(block, (hidden_states if block_input is None else block_input, attention_mask), out)
    return out


# -- merged (unloaded) blocks -----------------------------------------------------------------------------------------
class MergingBlockMixin:
    """Turns a plain HF encoder layer into one that merges tokens; used by ``merge_and_unload``. The instance keeps
    its class's parameters and state-dict keys; PYRA's modulation rides along as a child with non-persistent buffers
    (so the state dict stays the base model's)."""

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        modulation = getattr(self, "token_merge_modulation", None)
        return run_merging_block(
            self,
            self._token_merge_layout,
            hidden_states,
            attention_mask,
            kwargs,
            context=self._token_merge_context,
            layer=self._token_merge_layer,
            layer_name=self._token_merge_name,
            settings=self._token_merge_settings,
            modulate=modulation,
            fire_block_hooks=False,
        )


_MERGED_CLASSES: dict[type, type] = {}


def merged_block_class(base_cls: type) -> type:
    """A subclass of `base_cls` running the merging body, created once per class and importable by name (pickle)."""
    cls = _MERGED_CLASSES.get(base_cls)
    if cls is None:
        name = f"TokenMerging{base_cls.__name__}"
        cls = type(name, (MergingBlockMixin, base_cls), {"__module__": __name__, "__qualname__": name})
        globals()[name] = cls
        _MERGED_CLASSES[base_cls] = cls
    return cls


def make_merging_block(
    block: nn.Module,
    layout: BlockLayout,
    context: MergeContext,
    layer: int,
    layer_name: str,
    settings: MergeSettings,
    modulation: nn.Module | None = None,
) -> nn.Module:
    """Converts `block` in place into its token-merging subclass (same parameters, same state-dict keys)."""
    base_cls = type(block)
    if isinstance(block, MergingBlockMixin):
        base_cls = next(c for c in base_cls.__mro__[1:] if c in _MERGED_CLASSES)
    block.__class__ = merged_block_class(base_cls)
    block._token_merge_layout = layout
    block._token_merge_context = context
    block._token_merge_layer = layer
    block._token_merge_name = layer_name
    block._token_merge_settings = settings
    if modulation is not None:
        block.token_merge_modulation = modulation
    return block
