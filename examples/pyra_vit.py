"""Adapt a ViT with PYRA (LoRA + token merging + re-activation), then deploy it merged.

Bundled tiny ViT and a generated downstream set (no Hub; runtime: `benchmarks/runtimes.py`):

    python examples/pyra_vit.py --tiny

Any ViTForImageClassification checkpoint (e.g. google/vit-base-patch16-224-in21k, ViT-B/16 → PYRA's official
'low' / 'high' presets apply); the generated images are resized to the model's input size:

    python examples/pyra_vit.py --model google/vit-base-patch16-224-in21k --schedule high --epochs 5

The script prints the merging schedule and token counts, trains LoRA + PYRA with the official optimiser groups
(AdamW, no decay on 1-D tensors, PYRA tensors at --pyra-lr), saves the adapter, reloads it in a fresh PeftModel,
and deploys `merge_and_unload()`: LoRA folded into q/k/v, token merging and the PYRA modulation kept.
"""

from __future__ import annotations

import argparse

SETS = ("clutter", "colors", "drawings", "objects", "shapes", "textures")  # testing.CLASSIFICATION_SETS


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="bundled tiny ViT + generated data, no Hub access")
    parser.add_argument("--model", default="google/vit-base-patch16-224-in21k")
    parser.add_argument("--task", default="clutter", choices=sorted(SETS))
    parser.add_argument("--schedule", default="low", help="'low', 'high', an int r, or comma-separated r per layer")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--pyra-lr", type=float, default=None)
    parser.add_argument("--train-per-class", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


if __name__ == "__main__":
    parse_args()  # --help and argument errors answer here, before the heavy imports below

import tempfile

import numpy as np
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from torch.utils.flop_counter import FlopCounterMode
from transformers import ViTForImageClassification

import peft_effadapt  # noqa: F401  (registers the PEFT types with peft)
from peft_effadapt import PYRAConfig, pyra_param_groups
from peft_effadapt.testing import CLASSIFICATION_SETS, make_classification_dataset, tiny_vit
from peft_effadapt.testing.processing import ShapesImageProcessor, dataset_images


def schedule_arg(text: str):
    if text in ("low", "high"):
        return text
    values = [int(v) for v in text.split(",")]
    return values[0] if len(values) == 1 else values


def load_backbone(args, num_labels: int) -> ViTForImageClassification:
    if args.tiny:
        try:
            from peft_effadapt.testing import load_tiny_vit

            model, _ = load_tiny_vit()
        except (FileNotFoundError, ValueError):
            print("bundled tiny ViT missing (benchmarks/testbed/train_tiny_vit.py makes it): using random weights")
            model = tiny_vit(hidden_size=96, num_hidden_layers=4, intermediate_size=192, patch_size=4, num_labels=8)
        model.classifier = torch.nn.Linear(model.config.hidden_size, num_labels)
        model.config.num_labels = num_labels
        return model
    return ViTForImageClassification.from_pretrained(args.model, num_labels=num_labels, ignore_mismatched_sizes=True)


def images(task: str, split: str, size: int, n_per_class=None):
    data = make_classification_dataset(task, split, n_per_class=n_per_class)
    x = ShapesImageProcessor().to_pixel_values(dataset_images(data))
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    return x, torch.as_tensor(np.asarray(data["label"]))


def accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return sum((model(pixel_values=xb).logits.argmax(-1) == yb).sum().item()
                   for xb, yb in zip(x.split(128), y.split(128))) / len(y)


def mflops(model, size: int) -> float:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(pixel_values=torch.randn(1, 3, size, size))
    return counter.get_total_flops() / 1e6


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    classes = CLASSIFICATION_SETS[args.task].class_names
    base = load_backbone(args, len(classes))
    size = base.config.image_size
    x, y = images(args.task, "train", size, args.train_per_class)
    xt, yt = images(args.task, "test", size)

    config = PYRAConfig(merge_schedule=schedule_arg(args.schedule), lora_r=args.rank, pyra_lr=args.pyra_lr,
                        modules_to_save=["classifier"])
    model = get_peft_model(base, config)
    model.print_trainable_parameters()
    print("merging schedule (tokens removed per layer):", model.peft_config["default"].layer_schedule)
    print("tokens entering each layer / left at the end:", model.base_model.planned_token_counts())

    optimizer = torch.optim.AdamW(pyra_param_groups(model, lr=args.lr, weight_decay=1e-4))
    steps = args.epochs * ((len(y) + args.batch_size - 1) // args.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups],
                                                    total_steps=steps, pct_start=0.1)
    print(f"accuracy before training: {accuracy(model, xt, yt):.3f}")
    for epoch in range(args.epochs):
        model.train()
        for idx in torch.randperm(len(y)).split(args.batch_size):
            loss = F.cross_entropy(model(pixel_values=x[idx]).logits, y[idx])
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}")
    adapted = accuracy(model, xt, yt)
    print(f"accuracy after training: {adapted:.3f}")

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        reloaded = PeftModel.from_pretrained(load_backbone(args, len(classes)), folder)
        print(f"reloaded adapter accuracy: {accuracy(reloaded, xt, yt):.3f}")
    deployed = reloaded.merge_and_unload()  # a patched ViTForImageClassification: still merging tokens
    deployed.set_attn_implementation("eager")  # FLOPs of attention are only counted with eager
    plain = load_backbone(args, len(classes))
    plain.set_attn_implementation("eager")
    print(f"deployed accuracy: {accuracy(deployed, xt, yt):.3f}; "
          f"{mflops(deployed, size):.1f} MFLOPs/image vs {mflops(plain, size):.1f} without merging")


if __name__ == "__main__":
    main()
