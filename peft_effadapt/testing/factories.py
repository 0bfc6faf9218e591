"""Tiny randomly initialised models built from configs, for fast unit tests (no Hub access)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionModel,
    ResNetConfig,
    ResNetForImageClassification,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)


def tiny_vit_config(**overrides) -> ViTConfig:
    """The ViT of the Consolidator spec's tests: hidden 32, 2 layers, 4 heads, MLP 64, 32x32 images, patch 8."""
    kwargs = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=5,
    )
    kwargs.update(overrides)
    return ViTConfig(**kwargs)


def tiny_vit(seed: int = 0, with_head: bool = True, **overrides) -> ViTModel | ViTForImageClassification:
    torch.manual_seed(seed)
    config = tiny_vit_config(**overrides)
    model = ViTForImageClassification(config) if with_head else ViTModel(config, add_pooling_layer=False)
    return model.eval()


def tiny_clip_config(**overrides) -> CLIPConfig:
    """A CLIP with 2-layer towers of width 32, 32x32 images, patch 8 and a 64-token vocabulary."""
    text = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=64,
        max_position_embeddings=16,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
                  patch_size=8)
    text.update(overrides.pop("text_config", {}))
    vision.update(overrides.pop("vision_config", {}))
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16, **overrides)


def tiny_clip(seed: int = 0, **overrides) -> CLIPModel:
    torch.manual_seed(seed)
    return CLIPModel(tiny_clip_config(**overrides)).eval()


def tiny_clip_vision(seed: int = 0, **overrides) -> CLIPVisionModel:
    torch.manual_seed(seed)
    return CLIPVisionModel(tiny_clip_config(**overrides).vision_config).eval()


def tiny_pixel_values(batch: int = 2, image_size: int = 32, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, image_size, image_size, generator=generator)


def tiny_text_inputs(batch: int = 2, length: int = 8, vocab_size: int = 64, seed: int = 2) -> dict[str, torch.Tensor]:
    """Token ids of the form BOS w1 .. wk EOS PAD..., as a CLIP tokenizer would produce (BOS=1, EOS=2, PAD=0)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.zeros(batch, length, dtype=torch.long)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for row in range(batch):
        n_words = int(torch.randint(1, length - 1, (1,), generator=generator))
        ids[row, 0] = 1
        ids[row, 1 : 1 + n_words] = torch.randint(3, vocab_size, (n_words,), generator=generator)
        ids[row, 1 + n_words] = 2
        mask[row, : 2 + n_words] = 1
    return {"input_ids": ids, "attention_mask": mask}


def tiny_resnet(layer_type: str = "bottleneck", *, seed: int = 0, embedding_size: int = 8,
                hidden_sizes=(16, 32), depths=(2, 1), num_labels: int = 5,
                random_batchnorm: bool = False) -> ResNetForImageClassification:
    """A two-stage HF ResNet (bottleneck or basic layers) in eval mode, for pruning tests; `random_batchnorm`
    gives its BatchNorms non-trivial statistics (see `randomize_batchnorm`)."""
    torch.manual_seed(seed)
    config = ResNetConfig(embedding_size=embedding_size, hidden_sizes=list(hidden_sizes), depths=list(depths),
                          layer_type=layer_type, num_labels=num_labels)
    model = ResNetForImageClassification(config).eval()
    if random_batchnorm:
        randomize_batchnorm(model)
    return model


CNN_FAMILIES = ("convnext", "regnet-x", "regnet-y", "mobilenet_v2")


def tiny_cnn(family: str, *, seed: int = 0, num_labels: int = 5, with_head: bool = True,
             random_norms: bool = True, **overrides) -> nn.Module:
    """A tiny HF ConvNeXt, RegNet (X or Y: with squeeze-excitation; grouped 3x3 convs) or MobileNetV2 in eval mode
    (32x32 inputs suffice), for the traced channel groups. `random_norms` draws BatchNorm statistics and ConvNeXt
    layer scales away from their trivial initial values, so a channel mishandled by slimming shows in the outputs."""
    from transformers import (
        ConvNextConfig,
        ConvNextForImageClassification,
        ConvNextModel,
        MobileNetV2Config,
        MobileNetV2ForImageClassification,
        MobileNetV2Model,
        RegNetConfig,
        RegNetForImageClassification,
        RegNetModel,
    )

    torch.manual_seed(seed)
    if family == "convnext":
        config = ConvNextConfig(**{"hidden_sizes": [8, 16], "depths": [2, 1], "num_stages": 2,
                                   "layer_scale_init_value": 1.0, **overrides})
        classes = (ConvNextForImageClassification, ConvNextModel)
    elif family in ("regnet-x", "regnet-y"):
        config = RegNetConfig(**{"embedding_size": 8, "hidden_sizes": [16, 32], "depths": [1, 2], "groups_width": 8,
                                 "layer_type": family[-1], **overrides})
        classes = (RegNetForImageClassification, RegNetModel)
    elif family == "mobilenet_v2":
        config = MobileNetV2Config(**{"depth_multiplier": 0.25, "image_size": 32, "finegrained_output": False,
                                      **overrides})
        classes = (MobileNetV2ForImageClassification, MobileNetV2Model)
    else:
        raise ValueError(f"family must be one of {CNN_FAMILIES}, got {family!r}.")
    config.num_labels = num_labels
    model = (classes[0] if with_head else classes[1])(config).eval()
    if random_norms:
        randomize_batchnorm(model)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("layer_scale_parameter"):
                    param.normal_(1, 0.3)
    return model


@torch.no_grad()
def randomize_batchnorm(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm affine parameters and running statistics (drawn from torch's global RNG), so that a
    channel a slimming step mishandles shows up in the outputs."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.normal_(1, 0.3)
            module.bias.normal_(0, 0.3)
    return model
