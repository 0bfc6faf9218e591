"""Train the bundled tiny ViT (32x32 images, patch 4 -> 65 tokens) to classify shapes in generated images.

    python benchmarks/testbed/train_tiny_vit.py

Writes peft_effadapt/testing/checkpoints/tiny_vit/ and benchmarks/results/testbed_tiny_vit.json.
"""

from __future__ import annotations  # noqa: I001 - `common` puts the repo on sys.path first

import argparse
import time

import numpy as np
import torch
from common import REPO, set_seed, train_classifier, write_results
from transformers import ViTConfig, ViTForImageClassification

from peft_effadapt.testing.data import CLASSIFICATION_SETS, make_classification_dataset
from peft_effadapt.testing.evaluation import classifier_accuracy
from peft_effadapt.testing.processing import ShapesImageProcessor, dataset_images

TASK = "shapes"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=500)  # 100 at lr 2e-3 left the loss flat
    ap.add_argument("--patch-size", type=int, default=4)
    ap.add_argument("--per-class", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(REPO / "peft_effadapt/testing/checkpoints/tiny_vit"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    set_seed(args.seed)
    start = time.time()

    names = CLASSIFICATION_SETS[TASK].class_names
    config = ViTConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
                       image_size=32, patch_size=args.patch_size, num_labels=len(names),
                       id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    model = ViTForImageClassification(config)
    print(f"tiny ViT: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    processor = ShapesImageProcessor()
    train = make_classification_dataset(TASK, "train", n_per_class=args.per_class, seed=args.seed)
    pixels = processor.to_pixel_values(dataset_images(train))
    labels = torch.as_tensor(np.asarray(train["label"]))
    train_classifier(model, pixels, labels, args.steps, lr=args.lr, warmup=args.warmup, seed=args.seed,
                     desc="tiny ViT")
    train_time = time.time() - start

    metrics = {}
    for name in ("shapes", "clutter", "drawings"):  # same 8 classes, increasingly shifted styles
        acc = classifier_accuracy(model, make_classification_dataset(name, "test", seed=args.seed), processor)
        metrics[f"accuracy/{name}"] = acc
        print(f"tiny ViT accuracy on {name} test: {acc:.3f}")
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out, "ViTImageProcessor")
    wall = time.time() - start
    write_results("testbed_tiny_vit", {"task": TASK, "metrics": metrics, "train_seconds": round(train_time, 1),
                                       "wall_seconds": round(wall, 1), "threads": args.threads,
                                       "params": sum(p.numel() for p in model.parameters()), "args": vars(args)})
    print(f"done in {wall / 60:.1f} min with {args.threads} thread(s); saved to {args.out}")


if __name__ == "__main__":
    main()
