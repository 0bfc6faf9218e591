"""Train the bundled tiny ResNet (bottleneck layers) on the source domain of the domain-adaptation task.

    python benchmarks/testbed/train_tiny_resnet.py

It is both the small CNN for pruning methods and the source classifier for source-free domain adaptation: it
classifies the 8 shapes, is accurate on the source domain and much weaker on the shifted target domain.
Writes peft_effadapt/testing/checkpoints/tiny_resnet/ and benchmarks/results/testbed_tiny_resnet.json.
"""

from __future__ import annotations  # noqa: I001 - `common` puts the repo on sys.path first

import argparse
import time

import numpy as np
import torch
from common import REPO, set_seed, train_classifier, write_results
from transformers import ResNetConfig, ResNetForImageClassification

from peft_effadapt.testing.domains import make_domain_dataset
from peft_effadapt.testing.evaluation import classifier_accuracy
from peft_effadapt.testing.processing import ShapesImageProcessor, dataset_images
from peft_effadapt.testing.shapes import SHAPES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--per-class", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(REPO / "peft_effadapt/testing/checkpoints/tiny_resnet"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    set_seed(args.seed)
    start = time.time()

    config = ResNetConfig(num_channels=3, embedding_size=32, hidden_sizes=[64, 128, 256], depths=[2, 2, 2],
                          layer_type="bottleneck", hidden_act="relu", downsample_in_first_stage=False,
                          num_labels=len(SHAPES), id2label=dict(enumerate(SHAPES)),
                          label2id={n: i for i, n in enumerate(SHAPES)})
    model = ResNetForImageClassification(config)
    print(f"tiny ResNet: {sum(p.numel() for p in model.parameters()) / 1e6:.3f} M parameters")
    processor = ShapesImageProcessor()
    train = make_domain_dataset("source", "train", n_per_class=args.per_class, seed=args.seed)
    pixels = processor.to_pixel_values(dataset_images(train))
    labels = torch.as_tensor(np.asarray(train["label"]))
    train_classifier(model, pixels, labels, args.steps, lr=2e-3, weight_decay=1e-4, seed=args.seed,
                     desc="tiny ResNet")
    train_time = time.time() - start

    metrics = {}
    for domain in ("source", "target"):
        acc = classifier_accuracy(model, make_domain_dataset(domain, "test", seed=args.seed), processor)
        metrics[f"accuracy/{domain}"] = acc
        print(f"tiny ResNet accuracy on the {domain} domain (test): {acc:.3f}")
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out, "ConvNextImageProcessor")
    wall = time.time() - start
    write_results("testbed_tiny_resnet", {"task": "domain source -> target, 8 shapes", "metrics": metrics,
                                          "train_seconds": round(train_time, 1), "wall_seconds": round(wall, 1),
                                          "threads": args.threads,
                                          "params": sum(p.numel() for p in model.parameters()), "args": vars(args)})
    print(f"done in {wall / 60:.1f} min with {args.threads} thread(s); saved to {args.out}")


if __name__ == "__main__":
    main()
