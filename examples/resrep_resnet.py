"""ResRep on the bundled tiny ResNet: train with compactors under `transformers.Trainer`, slim at the end, reload.

    python examples/resrep_resnet.py                      # 70 % FLOPs, 300 steps (runtime: benchmarks/runtimes.py)
    python examples/resrep_resnet.py --steps 60 --flops-target 0.8 --output-dir /tmp/resrep   # smoke run: too short
                                                          # for rows to decay, the conversion warning says by how much

For your own HF ResNet (or a ViT with --target mlp): load it instead of `load_tiny_resnet`, keep the order
prepare -> optimizer -> Trainer, and use the paper's settings (lasso 1e-4, mask interval 200, warm-up 5 epochs,
lr 0.01 cosine, long schedule, compactor momentum 0.99). The short schedule here uses lasso 0.05, compactor momentum
0.9 and masks frozen after 30 % of the steps, so that masked compactor rows reach ~0 within a few hundred steps (with
momentum 0.99 and a large lasso a row overshoots zero and oscillates). ResRep prunes only the internal convs of the
bottlenecks; on this tiny ResNet they carry about half of the FLOPs, so 50 % remaining FLOPs leaves 1-6 channels
per layer.
"""

from __future__ import annotations

import argparse


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flops-target", type=float, default=0.7, help="remaining FLOPs fraction")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--lasso", type=float, default=0.05)
    parser.add_argument("--compactor-momentum", type=float, default=0.9)
    parser.add_argument("--round-to", type=int, default=None, help="keep widths at multiples (e.g. 8 or 16)")
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


if __name__ == "__main__":
    parse_args()  # --help and argument errors answer here, before the heavy imports below

import tempfile
import warnings

import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from peft_effadapt.pruning import ResRepCallback, count_flops, load_slimmed, resrep_param_groups
from peft_effadapt.testing import dataset_images, load_tiny_resnet, make_domain_dataset


def to_dataset(split, processor):
    data = make_domain_dataset("source", split)
    pixels = processor.to_pixel_values(dataset_images(data)).numpy()
    return Dataset.from_dict({"pixel_values": pixels, "labels": data["label"]}).with_format("torch")


def accuracy(model, data) -> float:
    model.eval()
    with torch.no_grad():
        logits = model(pixel_values=data[:]["pixel_values"]).logits
    return float((logits.argmax(-1) == data[:]["labels"]).float().mean())


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    output_dir = args.output_dir or tempfile.mkdtemp(prefix="resrep-")

    model, processor = load_tiny_resnet()
    train, test = to_dataset("train", processor), to_dataset("test", processor)
    example = {"pixel_values": test[:32]["pixel_values"]}
    print(f"unpruned accuracy {accuracy(model, test):.3f}")

    callback = ResRepCallback(flops_target=args.flops_target, lasso_strength=args.lasso, mask_interval=5,
                              warmup_steps=max(1, args.steps // 20), begin_granularity=32, freeze_masks_after=0.3,
                              drop_masked_rows=True, round_to=args.round_to)
    callback.prepare(model, example)  # compactors first: the optimizer below must see them
    groups = resrep_param_groups(model, lr=args.lr, compactor_momentum=args.compactor_momentum)
    optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=0.9)
    training = TrainingArguments(output_dir=output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                                 learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=0, max_grad_norm=0,
                                 save_strategy="no", report_to=[], logging_steps=max(1, args.steps // 6),
                                 use_cpu=True, seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=training, train_dataset=train, callbacks=[callback],
                      optimizers=(optimizer, None))
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        trainer.train()  # masks grow to the target, then BN + compactors fold and masked channels are removed

    measured = count_flops(model, example) / callback.flops.baseline
    print(f"masked FLOPs ratio {callback.masked_flops_ratio:.3f} (target {args.flops_target}), slimmed FLOPs ratio "
          f"{measured:.3f}, conversion max |delta| {callback.conversion_error:.2e}")
    print("widths", callback.plan.widths)
    print(f"slimmed accuracy {accuracy(model, test):.3f}")
    reloaded = load_slimmed(f"{output_dir}/slimmed")  # config.json + model.safetensors + slimming_plan.json
    print(f"reloaded accuracy {accuracy(reloaded, test):.3f} from {output_dir}/slimmed")


if __name__ == "__main__":
    main()
