"""The HF model families token merging runs on: the sub-module names of their pre-norm encoder layers, where the
encoder layers and the backbone sit, and how many leading tokens are protected.

Families are found by class (`isinstance` through the MRO), never by class name, so a user's subclass of
`ViTModel` or `CLIPModel` is accepted; a refused model gets the list of supported classes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn
from transformers.models.clip.modeling_clip import (
    CLIPEncoderLayer,
    CLIPModel,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
)
from transformers.models.deit.modeling_deit import (
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    DeiTLayer,
    DeiTModel,
)
from transformers.models.dinov2.modeling_dinov2 import Dinov2Layer, Dinov2Model
from transformers.models.dinov2_with_registers.modeling_dinov2_with_registers import (
    Dinov2WithRegistersLayer,
    Dinov2WithRegistersModel,
)
from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer, SiglipModel, SiglipVisionModel
from transformers.models.vit.modeling_vit import ViTForImageClassification, ViTLayer, ViTModel
from transformers.models.vit_mae.modeling_vit_mae import ViTMAELayer, ViTMAEModel

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
    layer_scale_attention: str | None = None  # DINOv2: learned per-channel scale on each residual branch
    layer_scale_mlp: str | None = None
    drop_path: str | None = None  # DINOv2: stochastic depth on each residual branch (identity in eval)


VIT_LAYOUT = BlockLayout(
    "layernorm_before", "layernorm_after", "attention", "q_proj", "k_proj", "v_proj", "o_proj", "mlp", "dropout",
    "scaling", "attention_dropout",
)
CLIP_LAYOUT = BlockLayout(
    "layer_norm1", "layer_norm2", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "mlp", None, "scale",
    "dropout",
)
DINOV2_LAYOUT = BlockLayout(
    "norm1", "norm2", "attention", "q_proj", "k_proj", "v_proj", "o_proj", "mlp", None, "scaling",
    "attention_dropout", layer_scale_attention="layer_scale1", layer_scale_mlp="layer_scale2", drop_path="drop_path",
)
LAYOUTS: dict[type, BlockLayout] = {
    ViTLayer: VIT_LAYOUT,
    DeiTLayer: VIT_LAYOUT,
    CLIPEncoderLayer: CLIP_LAYOUT,
    SiglipEncoderLayer: CLIP_LAYOUT,  # SigLIP's encoder layer has CLIP's sub-module names
    Dinov2Layer: DINOV2_LAYOUT,
    Dinov2WithRegistersLayer: DINOV2_LAYOUT,
    ViTMAELayer: VIT_LAYOUT,
}


def _lookup(cls: type, table: dict):
    """The entry of the most specific class of `cls`'s MRO that is in `table` (subclasses inherit it), or None."""
    return next((table[c] for c in cls.__mro__ if c in table), None)


def layout_of(block: nn.Module) -> BlockLayout | None:
    return _lookup(type(block), LAYOUTS)


@dataclass(frozen=True)
class ModelFamily:
    backbone: str  # module path of the model whose forward runs the embeddings and the encoder layers
    layers_regex: str  # default target_modules: every encoder layer of the (vision) tower
    protected: int  # leading tokens that are never merged (CLS, DeiT distillation token)
    vision_config: str | None  # attribute of model.config holding the vision config (None: model.config itself)
    text_layers_regex: str | None = None  # the text tower's encoder layers (CLIPModel)
    registers: str | None = None  # config field counting register tokens after CLS (DINOv2 with registers)


MODEL_FAMILIES: dict[type, ModelFamily] = {
    ViTModel: ModelFamily("", r"layers\.\d+", 1, None),
    ViTForImageClassification: ModelFamily("vit", r"vit\.layers\.\d+", 1, None),
    DeiTModel: ModelFamily("", r"layers\.\d+", 2, None),
    DeiTForImageClassification: ModelFamily("deit", r"deit\.layers\.\d+", 2, None),
    DeiTForImageClassificationWithTeacher: ModelFamily("deit", r"deit\.layers\.\d+", 2, None),
    CLIPVisionModel: ModelFamily("", r"encoder\.layers\.\d+", 1, None),
    CLIPVisionModelWithProjection: ModelFamily("vision_model", r"vision_model\.encoder\.layers\.\d+", 1, None),
    CLIPModel: ModelFamily(
        "vision_model", r"vision_model\.encoder\.layers\.\d+", 1, "vision_config", r"text_model\.encoder\.layers\.\d+"
    ),
    # SigLIP: no class token (nothing protected); the attention-pooling head reads every token (see merging.pooling)
    SiglipVisionModel: ModelFamily("", r"encoder\.layers\.\d+", 0, None),
    SiglipModel: ModelFamily("vision_model", r"vision_model\.encoder\.layers\.\d+", 0, "vision_config"),
    # DINOv2: CLS protected (the pooler reads it), plus the register tokens that follow it
    Dinov2Model: ModelFamily("", r"encoder\.layer\.\d+", 1, None),
    Dinov2WithRegistersModel: ModelFamily("", r"encoder\.layer\.\d+", 1, None, registers="num_register_tokens"),
    # MAE's encoder: CLS protected; it sees the (1 - mask_ratio) share of patches its embeddings keep
    ViTMAEModel: ModelFamily("", r"layers\.\d+", 1, None),
}
SUPPORTED_MODELS: tuple[str, ...] = tuple(cls.__name__ for cls in MODEL_FAMILIES)
_LAYER_INDEX = re.compile(r"layers?\.(\d+)$")


def model_family(
    model: nn.Module,
    method: str,
    supported: tuple[type, ...] | None = None,
    why: str = "token merging needs a pre-norm ViT-style encoder whose head reads the class token",
) -> ModelFamily:
    """The family of `model` (or of the closest supported class it derives from) among `supported` (default: all
    of MODEL_FAMILIES); raises ValueError listing the supported classes."""
    table = MODEL_FAMILIES if supported is None else {cls: MODEL_FAMILIES[cls] for cls in supported}
    family = _lookup(type(model), table)
    if family is None:
        raise ValueError(
            f"{method} supports only {', '.join(cls.__name__ for cls in table)} and their subclasses ({why}); got "
            f"{type(model).__name__}."
        )
    return family


def vision_config_of(model: nn.Module, family: ModelFamily):
    config = model.config
    return getattr(config, family.vision_config) if family.vision_config else config


def protected_count(model: nn.Module, family: ModelFamily) -> int:
    """Leading tokens never merged: the family's class token(s) plus any register tokens of this checkpoint."""
    registers = getattr(vision_config_of(model, family), family.registers, 0) if family.registers else 0
    return family.protected + int(registers)


def initial_token_count(model: nn.Module, family: ModelFamily) -> int:
    config = vision_config_of(model, family)
    patches = (config.image_size // config.patch_size) ** 2
    patches = int(patches * (1 - getattr(config, "mask_ratio", 0.0)))  # ViTMAE keeps this many (its own rounding)
    return patches + protected_count(model, family)


def check_attention(implementation: str | None, method: str, where: str) -> None:
    """Proportional attention is an additive float mask: only the eager and sdpa interfaces take one."""
    implementation = implementation or "eager"
    if implementation not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"{method} passes proportional attention as an additive float mask, which only the 'eager' and 'sdpa' "
            f"attention implementations take; {where} uses {implementation!r}. Load the model with "
            "attn_implementation='sdpa' (or 'eager'), or call model.set_attn_implementation('sdpa')."
        )


def layer_index(name: str) -> int:
    match = _LAYER_INDEX.search(name)
    if match is None:
        raise ValueError(f"cannot read a layer index from module name {name!r} (expected '...layers.<i>').")
    return int(match.group(1))


def backbone_name(layer_name: str) -> str:
    """'vit.layers.3' -> 'vit'; 'vision_model.encoder.layers.0' -> 'vision_model'; 'encoder.layer.1' -> ''."""
    return re.sub(r"(^|\.)(encoder\.)?layers?\.\d+$", "", layer_name)
