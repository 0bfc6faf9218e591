"""Token merging beyond the papers' backbones: inference speed of ToMe r=16 and PYRA (low schedule) against the
plain model, per family, at real base-size shapes with random weights (224 px images).

    python benchmarks/merging_families.py [--threads 2] [--batch 8] [--repeats 5]

Families: ViT-B/16 (the reference), DINOv2-B/14 with and without 4 registers, SigLIP-B/16 vision tower, MAE-B/16
encoder (mask_ratio 0, inference). Ratios are interleaved medians measured in one run (benchmarks/common.py);
GFLOPs are counted by torch.utils.flop_counter. Writes benchmarks/results/merging_families.json.
"""

from __future__ import annotations

import torch
from peft import get_peft_model
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    SiglipVisionConfig,
    SiglipVisionModel,
    ViTConfig,
    ViTMAEConfig,
    ViTMAEModel,
    ViTModel,
)

from peft_effadapt import PYRAConfig, ToMeConfig

from common import inference, interleaved_medians, speed_arguments, write_result

BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, image_size=224)
FAMILIES = {
    "ViT-B/16": lambda: ViTModel(ViTConfig(patch_size=16, **BASE), add_pooling_layer=False),
    "DINOv2-B/14": lambda: Dinov2Model(Dinov2Config(patch_size=14, **BASE)),
    "DINOv2-B/14 + 4 registers": lambda: Dinov2WithRegistersModel(
        Dinov2WithRegistersConfig(patch_size=14, num_register_tokens=4, **BASE)),
    "SigLIP-B/16 vision": lambda: SiglipVisionModel(SiglipVisionConfig(patch_size=16, **BASE)),
    "MAE-B/16 encoder": lambda: ViTMAEModel(ViTMAEConfig(patch_size=16, mask_ratio=0.0, **BASE)),
}


def gflops(model, x) -> float:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(pixel_values=x)
    return counter.get_total_flops() / 1e9 / x.shape[0]


def main():
    args = speed_arguments(__doc__).parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(args.batch, 3, 224, 224)
    rows = {}
    for name, make in FAMILIES.items():
        torch.manual_seed(0)
        models = {"plain": make().eval()}
        torch.manual_seed(0)
        models["ToMe r=16"] = get_peft_model(make().eval(), ToMeConfig(merge_schedule=16)).eval()
        torch.manual_seed(0)
        models["PYRA low"] = get_peft_model(make().eval(), PYRAConfig(merge_schedule="low")).eval()
        seconds = interleaved_medians({k: inference(m, pixel_values=x) for k, m in models.items()}, repeats=args.repeats, warmup=1)
        one = x[:1]
        rows[name] = {
            "gflops_per_image": {k: round(gflops(m, one), 2) for k, m in models.items()},
            "images_per_s": {k: round(args.batch / s, 2) for k, s in seconds.items()},
            "speedup_vs_plain": {k: round(seconds["plain"] / s, 3) for k, s in seconds.items()},
            "final_tokens": {k: m.base_model.token_counts()[-1] for k, m in models.items() if k != "plain"},
        }
        print(name, rows[name]["speedup_vs_plain"], flush=True)
    write_result("merging_families", {"batch": args.batch, "repeats": args.repeats, "families": rows})


if __name__ == "__main__":
    main()
