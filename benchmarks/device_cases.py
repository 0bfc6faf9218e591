"""Models, inputs, losses and PEFT configs of the device check, at real size (ViT-B/16, CLIP ViT-B/16 and B/32,
ResNet-50; random weights from configs) or tiny (`small=True`: peft_effadapt.testing's factories, the same code paths
in seconds on a CPU)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import transformers

import peft_effadapt
from peft_effadapt.testing import tiny_clip, tiny_clip_config, tiny_clip_vision, tiny_resnet, tiny_vit, tiny_vit_config

# CLIP BPE ids (the real tokenizer's): BOS, EOS, "X" as the prompt placeholder, "a photo of a" as context init.
BOS, EOS, PLACEHOLDER, DOT, CTX_INIT = 49406, 49407, 343, 269, [320, 1125, 539, 320]
TINY_BOS, TINY_EOS, TINY_PLACEHOLDER, TINY_DOT, TINY_CTX_INIT = 1, 2, 7, 5, [10, 11, 12, 13]
TINY_VIT = dict(image_size=64, num_labels=10)  # 65 tokens: room for ToMe/PYRA schedules
TINY_CLIP = dict(vision_config=dict(hidden_size=48))  # 32 -> 48: MaPLe's coupling is exercised
TINY_RESNET = dict(embedding_size=32, hidden_sizes=(64, 128))  # groups of 16-128 channels: room for aligned widths


def vit_config(small: bool) -> transformers.ViTConfig:
    return tiny_vit_config(**TINY_VIT) if small else transformers.ViTConfig(num_labels=1000)  # ViT-B/16, 224², 197 tokens


def vit(small: bool) -> transformers.ViTForImageClassification:
    """The ViT of the image cases (seed 0, train mode)."""
    if small:
        return tiny_vit(seed=0, **TINY_VIT).train()
    torch.manual_seed(0)
    return transformers.ViTForImageClassification(vit_config(small))


def clip_config(small: bool, patch: int) -> transformers.CLIPConfig:
    if small:
        return tiny_clip_config(**TINY_CLIP)
    return transformers.CLIPConfig(
        text_config=dict(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS),
        vision_config=dict(patch_size=patch),  # defaults: ViT-B, 224², 12 layers, width 768
        projection_dim=512,
    )


def clip(small: bool, patch: int) -> transformers.CLIPModel:
    """CLIP ViT-B/`patch` (seed 0, train mode); tiny: one model whatever the patch."""
    if small:
        return tiny_clip(seed=0, **TINY_CLIP).train()
    torch.manual_seed(0)
    return transformers.CLIPModel(clip_config(small, patch))


def vision_tower(small: bool, patch: int = 32) -> transformers.CLIPVisionModel:
    if small:
        return tiny_clip_vision(seed=0, **TINY_CLIP)
    torch.manual_seed(0)
    return transformers.CLIPVisionModel(clip_config(small, patch).vision_config)


def resnet_model(small: bool) -> transformers.ResNetForImageClassification:
    if small:
        return tiny_resnet(random_batchnorm=True, **TINY_RESNET).train()
    torch.manual_seed(0)
    return transformers.ResNetForImageClassification(transformers.ResNetConfig(num_labels=1000))  # ResNet-50 layout


def image_size(config) -> int:
    return config.vision_config.image_size if hasattr(config, "vision_config") else config.image_size


def prompt_ids(n_classes: int, length: int, small: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """'[BOS] X X X X {class}. [EOS]' token rows with 1-3 random class tokens, zero-padded to `length`."""
    bos, eos, ph, dot = (TINY_BOS, TINY_EOS, TINY_PLACEHOLDER, TINY_DOT) if small else (BOS, EOS, PLACEHOLDER, DOT)
    low, high = (20, 60) if small else (1000, 40000)
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(n_classes, length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i in range(n_classes):
        name = torch.randint(low, high, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g).tolist()
        row = [bos] + [ph] * 4 + name + [dot, eos]
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    return {"input_ids": ids, "attention_mask": mask}


def caption_ids(batch: int, length: int, small: bool, seed: int = 3) -> dict[str, torch.Tensor]:
    bos, eos = (TINY_BOS, TINY_EOS) if small else (BOS, EOS)
    high = 60 if small else 40000
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, high, (batch, length), generator=g)
    ids[:, 0], ids[:, -1] = bos, eos
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def pixels(batch: int, size: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _prompt_kwargs(small: bool) -> dict:
    return dict(ctx_init_token_ids=list(TINY_CTX_INIT if small else CTX_INIT),
                placeholder_token_id=TINY_PLACEHOLDER if small else PLACEHOLDER)


@dataclass
class Case:
    """One PEFT type on its model: `make_model()` is deterministic; `make_inputs(batch)` gives a dict of inputs."""

    name: str
    make_model: Callable[[], torch.nn.Module]
    make_config: Callable[[], object]
    make_inputs: Callable[..., dict[str, torch.Tensor]]  # (batch, ref=False); ref: the cheap CPU-reference batch
    output: Callable[[object], torch.Tensor]
    mergeable: bool = True
    settings: dict = field(default_factory=dict)
    bf16_tol: str = "bf16"  # key of device_check.TOL for its bf16 comparisons


def cases(small: bool, n_classes: int, text_len: int, frames: int) -> list[Case]:
    vit_size, clip_size = image_size(vit_config(small)), image_size(clip_config(small, 16))
    vit_model = lambda: vit(small)  # noqa: E731
    clip16, clip32 = (lambda: clip(small, 16)), (lambda: clip(small, 32))

    def vit_inputs(batch, ref=False):
        return {"pixel_values": pixels(batch, vit_size)}

    def prompt_inputs(batch, ref=False):  # the CPU reference encodes 8 class prompts, training all of them
        return {"pixel_values": pixels(batch, clip_size), **prompt_ids(min(n_classes, 8) if ref else n_classes,
                                                                       text_len, small)}

    def video_inputs(batch, ref=False):  # `batch` videos of `frames` frames (contiguous), one caption each
        return {"pixel_values": pixels(batch * frames, clip_size), **caption_ids(batch, text_len, small)}

    prompt = _prompt_kwargs(small)
    head = ["classifier"]
    merge_r = 4 if small else 16
    tempme = (dict(num_frames=frames, imgme_r=2, clip_merge_layers=[1], clip_group_sizes=[frames], lora_r=2)
              if small else dict(num_frames=frames))  # official ViT-B/32 setting
    logits, clip_logits = (lambda out: out.logits), (lambda out: out.logits_per_image)
    return [
        Case("consolidator", vit_model, lambda: peft_effadapt.ConsolidatorConfig(
            rep_drop=0.0, modules_to_save=head, init_weights=False), vit_inputs, logits),
        Case("tome", vit_model, lambda: peft_effadapt.ToMeConfig(merge_schedule=merge_r, clamp_schedule=True,
                                                                   modules_to_save=head),
             vit_inputs, logits, settings={"merge_schedule": merge_r}, bf16_tol="bf16_token_merging"),
        # PYRA from its own initialisation (LoRA B = 0): a random LoRA on q/k/v makes bf16 flip which tokens merge
        Case("pyra", vit_model, lambda: peft_effadapt.PYRAConfig(merge_schedule="low", lora_dropout=0.0,
                                                           modules_to_save=head), vit_inputs, logits,
             bf16_tol="bf16_token_merging"),
        Case("coop", clip16, lambda: peft_effadapt.CoOpConfig(**prompt), prompt_inputs, clip_logits),
        Case("rlp", clip16, lambda: peft_effadapt.RLPConfig(rank=1, lowrank_dropout=0.0, init_weights=False,
                                                            **prompt), prompt_inputs, clip_logits),
        Case("qprompt-coop", clip16, lambda: peft_effadapt.QPromptConfig(host="coop", bits=1, **prompt),
             prompt_inputs, clip_logits),
        Case("qprompt-rlp", clip16, lambda: peft_effadapt.QPromptConfig(
            host="rlp", bits=2, rlp_rank=1, rlp_dropout=0.0, **prompt), prompt_inputs, clip_logits),
        Case("qprompt-maple", clip16, lambda: peft_effadapt.QPromptConfig(
            host="maple", bits=4, prompt_depth=2 if small else 9, **prompt), prompt_inputs, clip_logits,
             mergeable=False),
        Case("tempme", clip32, lambda: peft_effadapt.TempMeConfig(init_weights=False, **tempme), video_inputs,
             clip_logits, settings={"frames": frames, **tempme}, bf16_tol="bf16_token_merging"),
    ]



# -- inputs and losses ------------------------------------------------------------------------------------------------
def to(inputs: dict, device, dtype: torch.dtype | None = None) -> dict:
    """`inputs` on `device`; floating tensors also cast to `dtype` when given."""
    return {k: v.to(device, dtype if dtype is not None and v.is_floating_point() else None)
            for k, v in inputs.items()}


def autocast(device, enabled: bool = True):
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=enabled)


def labels_for(logits: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(logits.shape[0] * 1000 + logits.shape[-1])
    return torch.randint(0, logits.shape[-1], (logits.shape[0],), generator=g).to(logits.device)


def ce_loss(logits: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels_for(logits))


def trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
