"""PYRA vs LoRA and LoRA + ToMe: accuracy against GFLOPs on the testbed ViT, and CPU speed on a ViT-B/16 shape.

(a) Accuracy vs compute. The bundled tiny ViT (`load_tiny_vit()`: 32x32 images, patch 4 -> 65 tokens, 4 layers)
    is adapted to a shifted downstream set (default `clutter`) with a new head and
    * LoRA without merging         PYRAConfig(merge_schedule=0): LoRA r=8 on q/k/v (shared A, scale 1)
    * LoRA + ToMe (low / high)     PYRA with the modulation frozen at identity (W_D = 0): exactly LoRA + ToMe
    * PYRA (low / high)            the full method
    GFLOPs: torch.utils.flop_counter.FlopCounterMode, eager attention, one image, after merge_and_unload (LoRA
    folded: the deployed model). The claim checked: PYRA keeps more accuracy than LoRA + ToMe at equal compression.
    If the bundled checkpoint is absent the script pretrains the same architecture on `shapes` first (--pretrain-steps).
    --backbone clip: the same experiment on the bundled tiny CLIP's vision tower (`load_tiny_clip()`: 32x32, patch 4
    -> 65 tokens, 3 layers) as a `CLIPVisionModel` (PYRA wraps it; CLIPForImageClassification mean-pools the patch
    tokens and is not a supported token-merging model) with a seeded linear head on its pooled class token. Written
    under `accuracy_vs_flops_clip` (plot pyra_clip.png); the other sections of pyra.json are kept.
(b) Speed (--speed): ViT-B/16-shaped ViTForImageClassification, random weights, batch 8, 224x224, inference:
    images/s of ToMe r=16 and of merged PYRA low/high relative to the unmerged model and to ToMe r=16.

    python benchmarks/pyra.py [--backbone vit|clip] [--threads 1] [--task clutter] [--epochs 15] [--seeds 0 1]
                              [--speed] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from types import SimpleNamespace

import numpy as np
import torch
from peft import get_peft_model
from plots import pyra_figure
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPVisionModel, ViTConfig, ViTForImageClassification

from peft_effadapt import PYRAConfig, ToMeConfig, pyra_param_groups
from peft_effadapt.metrics import load_metric
from peft_effadapt.testing import CLASSIFICATION_SETS, make_classification_dataset
from peft_effadapt.testing.processing import ShapesImageProcessor, dataset_images

from common import RESULTS, inference, interleaved_medians, write_result

METHODS = {
    "lora": dict(merge_schedule=0, freeze_modulation=False),
    "lora+tome-low": dict(merge_schedule="low", freeze_modulation=True),
    "pyra-low": dict(merge_schedule="low", freeze_modulation=False),
    "lora+tome-high": dict(merge_schedule="high", freeze_modulation=True),
    "pyra-high": dict(merge_schedule="high", freeze_modulation=False),
}


# -- data and backbone --------------------------------------------------------------------------------------------
def tensors(name: str, split: str, processor, seed: int = 0, n_per_class=None):
    data = make_classification_dataset(name, split, seed=seed, n_per_class=n_per_class)
    return processor.to_pixel_values(dataset_images(data)), torch.as_tensor(np.asarray(data["label"]))


def backbone(args) -> tuple[str, ViTForImageClassification, ShapesImageProcessor]:
    try:
        from peft_effadapt.testing import load_tiny_vit

        model, processor = load_tiny_vit()
        return "bundled tiny_vit", model, processor
    except (FileNotFoundError, ValueError) as err:
        print(f"bundled tiny ViT not available ({err}); pretraining the same architecture on 'shapes'")
    torch.manual_seed(0)
    names = CLASSIFICATION_SETS["shapes"].class_names
    config = ViTConfig(hidden_size=96, num_hidden_layers=4, num_attention_heads=4, intermediate_size=192,
                       image_size=32, patch_size=4, num_labels=len(names))
    model = ViTForImageClassification(config)
    processor = ShapesImageProcessor()
    x, y = tensors("shapes", "train", processor, n_per_class=args.pretrain_per_class)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 1e-3, total_steps=args.pretrain_steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _step in range(args.pretrain_steps):
        idx = torch.randint(0, len(y), (64,), generator=generator)
        loss = torch.nn.functional.cross_entropy(model(pixel_values=x[idx]).logits, y[idx])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    return f"tiny ViT pretrained here ({args.pretrain_steps} steps on shapes)", model.eval(), processor


class CLIPVisionClassifier(torch.nn.Module):
    """The CLIP vision tower plus a linear head on its pooled (post-LayerNorm) class token; PYRA adapts `tower`."""

    def __init__(self, tower: CLIPVisionModel, num_labels: int):
        super().__init__()
        self.tower, self.config = tower, tower.config
        self.classifier = torch.nn.Linear(tower.config.hidden_size, num_labels)

    def set_attn_implementation(self, implementation: str) -> None:
        self.tower.set_attn_implementation(implementation)

    def forward(self, pixel_values):
        return SimpleNamespace(logits=self.classifier(self.tower(pixel_values=pixel_values).pooler_output))


def clip_backbone():
    from peft_effadapt.testing import load_tiny_clip

    clip, processor = load_tiny_clip()
    tower = clip.vision_model  # in transformers 5 the CLIPModel's vision tower is itself a CLIPVisionModel
    if not isinstance(tower, CLIPVisionModel):
        raise TypeError(f"expected CLIPModel.vision_model to be a CLIPVisionModel, got {type(tower).__name__}")
    return "bundled tiny_clip vision tower", CLIPVisionClassifier(tower.eval(), 1).eval(), processor.image_processor


def with_new_head(model: ViTForImageClassification, num_labels: int, seed: int) -> ViTForImageClassification:
    model = copy.deepcopy(model)
    torch.manual_seed(seed)
    head = torch.nn.Linear(model.config.hidden_size, num_labels)
    torch.nn.init.trunc_normal_(head.weight, std=0.02)
    torch.nn.init.zeros_(head.bias)
    model.classifier = head
    model.config.num_labels = num_labels
    return model


# -- (a) accuracy vs GFLOPs ---------------------------------------------------------------------------------------
def accuracy(model, x, y, batch: int = 256) -> float:
    """Top-1 accuracy as a fraction (the package's `top1_accuracy` evaluate module, / 100)."""
    model.eval()
    with torch.no_grad():
        preds = torch.cat([model(pixel_values=x[i : i + batch]).logits.argmax(-1) for i in range(0, len(y), batch)])
    return load_metric("top1_accuracy").compute(predictions=preds.numpy(), references=y.numpy())["accuracy"] / 100


def gflops(model, image_size: int) -> float:
    model = copy.deepcopy(model).eval()
    model.set_attn_implementation("eager") if hasattr(model, "set_attn_implementation") else None
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(pixel_values=torch.randn(1, 3, image_size, image_size))
    return counter.get_total_flops() / 1e9


def adapt(base, method: dict, data, args, seed: int):
    (x, y), (xt, yt) = data
    torch.manual_seed(seed)
    config = dict(merge_schedule=method["merge_schedule"], lora_r=args.rank, pyra_lr=getattr(args, "pyra_lr", None))
    if isinstance(base, CLIPVisionClassifier):  # PYRA wraps the tower; the head outside it stays trainable
        model = base
        model.tower = peft = get_peft_model(base.tower, PYRAConfig(**config))
    else:
        model = peft = get_peft_model(base, PYRAConfig(**config, modules_to_save=["classifier"]))
    if method["freeze_modulation"]:
        for name, p in model.named_parameters():
            if any(k in name for k in (".pyra_w_r.", ".pyra_w_d.", ".pyra_norm.")):
                p.requires_grad_(False)  # W_D stays 0: the modulation is the identity, i.e. LoRA + ToMe
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(pyra_param_groups(model, lr=args.lr, weight_decay=1e-4))
    steps_per_epoch = math.ceil(len(y) / args.batch)
    total = args.epochs * steps_per_epoch
    warmup = max(1, total // 10)
    def lr_factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _epoch in range(args.epochs):
        model.train()
        for idx in torch.randperm(len(y), generator=generator).split(args.batch):
            loss = torch.nn.functional.cross_entropy(model(pixel_values=x[idx]).logits, y[idx])
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
    train_seconds = time.perf_counter() - start
    acc = accuracy(model, xt, yt)
    if isinstance(model, CLIPVisionClassifier):
        model.tower = peft.merge_and_unload()
        deployed = model
    else:
        deployed = model.merge_and_unload()
    acc_deployed = accuracy(deployed, xt, yt)
    return {"accuracy": acc, "accuracy_merged": acc_deployed, "train_seconds": round(train_seconds, 1),
            "gflops": gflops(deployed, x.shape[-1]),
            "trainable": trainable,
            "layer_schedule": peft.peft_config["default"].layer_schedule}


def run_accuracy(args) -> dict:
    source, base, processor = backbone(args) if args.backbone == "vit" else clip_backbone()
    names = CLASSIFICATION_SETS[args.task].class_names
    data = (tensors(args.task, "train", processor, n_per_class=args.train_per_class),
            tensors(args.task, "test", processor))
    size, patch = base.config.image_size, base.config.patch_size
    results = {"backbone": source, "task": args.task, "classes": len(names), "tokens": (size // patch) ** 2 + 1,
               "base_gflops": gflops(base, size), "methods": {}}
    same_classes = tuple(names) == tuple(CLASSIFICATION_SETS["shapes"].class_names)
    if args.backbone == "vit" and same_classes:  # same classes: the pretrained head applies
        results["backbone_accuracy_before_adaptation"] = accuracy(base, *data[1])
        shapes_test = tensors("shapes", "test", processor)
        results["backbone_accuracy_on_shapes"] = accuracy(base, *shapes_test)
        print(f"backbone before adaptation: {results['backbone_accuracy_before_adaptation']:.3f} on {args.task}, "
              f"{results['backbone_accuracy_on_shapes']:.3f} on shapes")
    for name, method in METHODS.items():
        runs = [adapt(with_new_head(base, len(names), seed), method, data, args, seed) for seed in args.seeds]
        summary = {key: float(np.mean([r[key] for r in runs])) for key in ("accuracy", "accuracy_merged", "gflops")}
        summary.update(accuracy_std=float(np.std([r["accuracy"] for r in runs])), trainable=runs[0]["trainable"],
                       layer_schedule=runs[0]["layer_schedule"], runs=runs)
        results["methods"][name] = summary
        print(f"{name:16s} r per layer {summary['layer_schedule']}  "
              f"acc {summary['accuracy']:.3f} ± {summary['accuracy_std']:.3f} "
              f"(merged {summary['accuracy_merged']:.3f})  {summary['gflops'] * 1e3:.2f} MFLOPs")
    return results


# -- (b) speed ----------------------------------------------------------------------------------------------------
def run_speed(args) -> dict:
    torch.manual_seed(0)
    base = ViTForImageClassification(ViTConfig(num_labels=10)).eval()
    models = {"unmerged": base}
    models["tome-r16"] = get_peft_model(copy.deepcopy(base), ToMeConfig(merge_schedule=16, clamp_schedule=True)).merge_and_unload()
    for preset in ("low", "high"):
        pyra = get_peft_model(copy.deepcopy(base), PYRAConfig(merge_schedule=preset, init_weights=False))
        models[f"pyra-{preset}"] = pyra.merge_and_unload()
    x = torch.randn(args.speed_batch, 3, 224, 224)

    seconds = interleaved_medians({k: inference(m, pixel_values=x) for k, m in models.items()}, repeats=args.repeats, warmup=1)
    ips = {k: args.speed_batch / s for k, s in seconds.items()}
    result = {
        "model": "ViT-B/16 shape (random weights), fp32, sdpa",
        "batch": args.speed_batch,
        "images_per_second": {k: round(v, 2) for k, v in ips.items()},
        "vs_unmerged": {k: round(v / ips["unmerged"], 3) for k, v in ips.items()},
        "vs_tome_r16": {k: round(v / ips["tome-r16"], 3) for k, v in ips.items()},
        "gmacs": {k: round(gflops(m, 224) / 2, 2) for k, m in models.items()},
    }
    print(result)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--backbone", default="vit", choices=["vit", "clip"],
                        help="clip: the accuracy experiment on the tiny CLIP vision tower (no speed part)")
    parser.add_argument("--task", default="clutter", choices=sorted(CLASSIFICATION_SETS))
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--train-per-class", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--pretrain-steps", type=int, default=800)
    parser.add_argument("--pretrain-per-class", type=int, default=400)
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--speed", action="store_true", help="also time a ViT-B/16 shape (slow on CPU)")
    parser.add_argument("--speed-batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    payload = {"args": vars(args)}
    previous = RESULTS / "pyra.json"
    old = json.loads(previous.read_text()) if previous.exists() else {}
    if args.backbone == "clip":
        if args.skip_accuracy or args.speed:
            parser.error("--backbone clip runs the accuracy experiment only (no --skip-accuracy / --speed)")
        kept = ("accuracy_vs_flops", "plot", "speed")
    else:
        kept = ("accuracy_vs_flops", "plot") if args.skip_accuracy else ("speed",) if not args.speed else ()
    kept += ("accuracy_vs_flops_clip", "plot_clip") if args.backbone == "vit" else ()
    for key in kept:  # keep the last run of the part not rerun now, with the command that made it
        if key in old:
            kept_from = {"command": old.get("command"), "args": old.get("args")}  # a section's own provenance wins
            payload[key] = {**kept_from, **old[key]} if isinstance(old[key], dict) else old[key]
    if args.backbone == "clip":
        payload["accuracy_vs_flops_clip"] = run_accuracy(args)
        pyra_figure(payload["accuracy_vs_flops_clip"], RESULTS / "pyra_clip.png", model="tiny CLIP vision tower")
        payload["plot_clip"] = "benchmarks/results/pyra_clip.png"
    elif not args.skip_accuracy:
        payload["accuracy_vs_flops"] = run_accuracy(args)
        pyra_figure(payload["accuracy_vs_flops"], RESULTS / "pyra.png", model="tiny ViT")
        payload["plot"] = "benchmarks/results/pyra.png"
    if args.speed:
        payload["speed"] = run_speed(args)
    write_result("pyra", payload)


if __name__ == "__main__":
    main()
