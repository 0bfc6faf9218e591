"""Source-free active domain adaptation with LFTL: label a few target samples per round, adapt with VPA.

Bundled testbed (no Hub): the tiny ResNet trained on the source shapes domain (~96 % there, ~48 % on the shifted
target domain) adapts to the target domain's training images; accuracy is measured on the target test split.

    python examples/lftl_adapt.py                          # contrastive sampling, full fine-tuning
    python examples/lftl_adapt.py --lora 8                 # LoRA (rank 8) on the convolutions + the head
    python examples/lftl_adapt.py --sampler random         # a baseline strategy
    python examples/lftl_adapt.py --output-dir runs/lftl   # interrupt it (Ctrl-C) and rerun: it resumes

Every round's state (queried ids, labels, anchor memory, sampler cache, weights or adapter) is written atomically
under --output-dir; rerunning with the same directory continues without asking for any label twice.
"""

from __future__ import annotations

import argparse


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default=None, help="round states (default: a temporary directory)")
    parser.add_argument("--sampler", default="contrastive", choices=["contrastive", "entropy", "margin", "random"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ratio", type=float, default=0.02, help="fraction of the pool labelled per round")
    parser.add_argument("--epochs", type=float, default=3, help="epochs over the unlabelled pool per round")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--pool-per-class", type=int, default=64)
    parser.add_argument("--lora", type=int, default=0, help="LoRA rank on the ResNet convolutions (0: full FT)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


if __name__ == "__main__":
    parse_args()  # --help and argument errors answer here, before the heavy imports below

import tempfile

import torch

import peft_effadapt  # noqa: F401  (registers the PEFT types with peft)
from peft_effadapt import ActiveAdaptationLoop, ImagePreprocess, LFTLConfig
from peft_effadapt.testing import load_source_classifier, make_domain_dataset


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model, processor = load_source_classifier()
    if args.lora:
        from peft import LoraConfig, get_peft_model

        # The head is trained in full; batch-norm layers are saved too, since their statistics move in train mode.
        model = get_peft_model(model, LoraConfig(r=args.lora, lora_alpha=args.lora, target_modules=["convolution"],
                                                 modules_to_save=["classifier", "normalization"]))
        model.print_trainable_parameters()
    pool = make_domain_dataset("target", "train", n_per_class=args.pool_per_class)
    test = make_domain_dataset("target", "test", n_per_class=32)
    config = LFTLConfig(num_rounds=args.rounds, ratio_per_round=args.ratio, epochs_per_round=args.epochs, lr=args.lr,
                        backbone_lr_mult=1.0 if args.lora else 0.1, seed=args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        loop = ActiveAdaptationLoop(model, pool, args.output_dir or tmp, config=config, sampler=args.sampler,
                                    preprocess=ImagePreprocess(processor),
                                    train_preprocess=ImagePreprocess(processor, hflip=True), eval_dataset=test)
        print(f"pool {len(pool)} target images, budget per round {loop.schedule}")
        history = loop.run()
    print(f"{'round':>5} {'labelled':>8} {'accuracy':>8} {'mean/class':>10}")
    for h in history:
        print(f"{h['round']:>5} {h['num_labelled']:>8} {h['accuracy']:>8.3f} {h['mean_class_accuracy']:>10.3f}")
    return history


if __name__ == "__main__":
    main()
