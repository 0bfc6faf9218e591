"""Consolidator on a ViT-B/16-shaped ViTForImageClassification (random weights): speed, parameters, storage.

(a) latency of the merged model / latency of the base model (inference, batch 8, 224x224; goal <= 1.01);
(b) training step time / peft LoRA step time at (nearly) equal trainable parameters (goal <= 1.3);
(c) trainable parameters and stored adapter bytes against spec §b.7 (1,370,112 B = 1.31 MiB fp32 without head).

    python benchmarks/consolidator.py [--threads 2] [--batch 8] [--repeats 5] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from transformers import ViTConfig, ViTForImageClassification

from peft_effadapt import ConsolidatorConfig

from common import interleaved_medians, write_result

BLOCK_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]


def vit_b16(num_labels: int = 10) -> ViTForImageClassification:
    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(num_labels=num_labels)).eval()


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def stored_bytes(model) -> dict:
    """What the shipped (consolidated) adapter file holds; consolidates `model` in place."""
    model.consolidate()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        path = Path(tmp) / "adapter_model.safetensors"
        with safe_open(path, "pt") as handle:
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
        return {
            "tensor_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
            "values": sum(t.numel() for t in tensors.values()),
            "file_bytes": path.stat().st_size,
        }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(fn, *a):
        def run():
            fn(*a)
            sync()
        return run

    pixel_values = torch.randn(args.batch, 3, 224, 224, device=device)
    labels = torch.randint(0, 10, (args.batch,), device=device)

    # (c) parameters and storage of the official configuration (one branch, g = 384, no head)
    official = get_peft_model(vit_b16(), ConsolidatorConfig())
    branch_params = sum(p.numel() for n, p in official.named_parameters() if "consolidator_branches" in n)
    official_trainable = trainable(official)
    storage = stored_bytes(official)
    fp16_storage = stored_bytes(get_peft_model(vit_b16(), ConsolidatorConfig(storage_dtype="float16")))

    # (a) merged vs base latency, measured interleaved so that machine noise hits both alike
    base = vit_b16().to(device)
    merged = get_peft_model(vit_b16(), ConsolidatorConfig(modules_to_save=["classifier"])).merge_and_unload()
    unmerged = get_peft_model(vit_b16(), ConsolidatorConfig(modules_to_save=["classifier"])).to(device)
    latency = interleaved_medians(
        {name: timed(inference_once, model, pixel_values)
         for name, model in [("base", base), ("merged", merged.to(device)), ("unmerged", unmerged)]},
        args.repeats,
    )
    del base, merged, unmerged

    # (b) training step vs LoRA at nearly equal trainable parameters: branches only vs rank-2 LoRA on the same layers
    models = {
        "consolidator_branches_only": get_peft_model(
            vit_b16(), ConsolidatorConfig(train_bias=False, train_layernorm=False, modules_to_save=["classifier"])
        ),
        "lora_r2": get_peft_model(
            vit_b16(), LoraConfig(r=2, lora_alpha=4, target_modules=BLOCK_LINEARS, modules_to_save=["classifier"])
        ),
        "consolidator_official_recipe": get_peft_model(vit_b16(), ConsolidatorConfig(modules_to_save=["classifier"])),
    }
    steps = interleaved_medians(
        {name: timed(train_step_once, model.to(device), pixel_values, labels) for name, model in models.items()},
        args.repeats,
    )
    results = {name: {"trainable": trainable(model), "step_seconds": steps[name]} for name, model in models.items()}

    write_result("consolidator", {
        "model": "ViTForImageClassification, ViTConfig() (ViT-B/16 shape), random weights, 10 labels",
        "batch": args.batch,
        "image_size": 224,
        "a_latency": {
            **{f"{name}_seconds": seconds for name, seconds in latency.items()},
            "merged_over_base": latency["merged"] / latency["base"],
            "unmerged_over_base": latency["unmerged"] / latency["base"],
            "goal": "merged_over_base <= 1.01",
        },
        "b_training_step": {
            **results,
            "consolidator_over_lora": results["consolidator_branches_only"]["step_seconds"]
            / results["lora_r2"]["step_seconds"],
            "official_recipe_over_lora": results["consolidator_official_recipe"]["step_seconds"]
            / results["lora_r2"]["step_seconds"],
            "goal": "consolidator_over_lora <= 1.3",
        },
        "c_storage": {
            "branch_parameters": branch_params,
            "branch_parameters_percent_of_backbone": 100 * branch_params / 85_798_656,
            "trainable_official_no_head": official_trainable,
            "stored_fp32": storage,
            "stored_fp16": fp16_storage,
            "spec_b7_bytes_fp32": 1_370_112,
        },
    })


def inference_once(model, pixel_values):
    model.eval()
    with torch.inference_mode():
        model(pixel_values=pixel_values)


_optimizers: dict[int, torch.optim.Optimizer] = {}


def train_step_once(model, pixel_values, labels):
    model.train()
    optimizer = _optimizers.setdefault(
        id(model), torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    )
    model(pixel_values=pixel_values, labels=labels).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


if __name__ == "__main__":
    main()
