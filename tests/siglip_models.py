"""A tiny `SiglipModel` and prompts in SigLIP's layout for the prompt-method tests (no Hub).

Vocabulary of 64 ids, EOS = PAD = 2 (SigLIP pads with `</s>`), no BOS; 16 text positions, so every prompt is
padded to 16 as SigLIP's processor does (`padding="max_length"`). Same text width (32) as `tiny_clip`, so stored
parameter counts can be compared.
"""

from __future__ import annotations

import math

import torch
from transformers import SiglipConfig, SiglipModel

from peft_effadapt.testing import tiny_pixel_values

EOS = PAD = 2
MAX_LENGTH = 16
PLACEHOLDER_ID = 7
CTX_IDS = [10, 11, 12, 13]  # "a photo of a"
CLASS_IDS = [[20, 5], [21, 22, 5], [23, 24, 25, 5]]  # "{class}." per class ("." = 5)


def tiny_siglip(seed: int = 0) -> SiglipModel:
    """2-layer towers of width 32, 32x32 images, patch 8; logit_scale = log 10 and logit_bias = -2.5 (SigLIP's own
    initialisation), so the bias visibly enters the logits."""
    text = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=64,
                max_position_embeddings=MAX_LENGTH, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
                  patch_size=8)
    torch.manual_seed(seed)
    model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
    with torch.no_grad():
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-2.5)
    return model.eval()


def siglip_rows(body: list[list[int]]) -> torch.Tensor:
    """`body </s>` padded with PAD to MAX_LENGTH, built by hand (the tests compare the library's helpers to it)."""
    ids = torch.full((len(body), MAX_LENGTH), PAD, dtype=torch.long)
    for i, row in enumerate(body):
        ids[i, : len(row) + 1] = torch.tensor(row + [EOS])
    return ids


def placeholder_inputs() -> dict[str, torch.Tensor]:
    """"X X X X {class}. </s>" for the 3 classes, and 2 images (no attention mask, as SigLIP's processor)."""
    return {"pixel_values": tiny_pixel_values(batch=2),
            "input_ids": siglip_rows([[PLACEHOLDER_ID] * 4 + ids for ids in CLASS_IDS])}


def zero_shot_inputs() -> dict[str, torch.Tensor]:
    """"a photo of a {class}. </s>": the zero-shot prompts the adapters start from."""
    return {"pixel_values": tiny_pixel_values(batch=2), "input_ids": siglip_rows([CTX_IDS + ids for ids in CLASS_IDS])}


def prompt_kwargs() -> dict:
    return dict(ctx_init_token_ids=list(CTX_IDS), placeholder_token_id=PLACEHOLDER_ID)
