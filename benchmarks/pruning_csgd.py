"""C-SGD row of the pruning experiment: the bundled tiny ResNet (source domain) slimmed to about 50 % FLOPs.

    python benchmarks/pruning_csgd.py                       # all groups (CIFAR setting) -> results/pruning_csgd.json
    python benchmarks/pruning_csgd.py --scope internal      # internal bottleneck convs only (ResRep's/L1's scope)

`run_csgd(...)` is also what `benchmarks/pruning.py` calls for its table (`csgd_row`, same data, FLOPs ratio, steps
and schedule as its other rows). Widths come from one uniform keep ratio over the chosen groups, the largest whose
FLOPs are <= the target; the model is trained with the callback through `transformers.Trainer` (SGD, Nesterov
momentum 0.9) and trimmed at train end with the equivalence check on; accuracy on the source test split.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from peft_effadapt.pruning import CentripetalSGDCallback, count_flops, widths_for_flops
from peft_effadapt.testing import dataset_images, load_tiny_resnet, make_domain_dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import top1  # noqa: E402


def _tensors(processor, split: str, n_per_class: int | None):
    data = make_domain_dataset("source", split, n_per_class=n_per_class)
    return processor.to_pixel_values(dataset_images(data)), torch.tensor(data["label"])


def run_csgd(train=None, test=None, flops_ratio: float = 0.5, steps: int = 600, seed: int = 0, lr: float = 0.03,
             centripetal_strength: float = 1.0, scope: str = "all", schedule: str = "constant", batch_size: int = 64,
             round_to: int = 1) -> dict:
    """Accuracy of the tiny ResNet after C-SGD at <= `flops_ratio` of its FLOPs. `train`/`test` are
    (pixel_values, labels) tensor pairs (default: the source domain's splits); `scope` "all" prunes every group
    (stem, internal convs, residual streams), "internal" only the bottlenecks' internal convs."""
    model, processor = load_tiny_resnet()
    train = train if train is not None else _tensors(processor, "train", None)
    test = test if test is not None else _tensors(processor, "test", None)
    x = test[0][:1]
    flops0, params0 = count_flops(model, x), sum(p.numel() for p in model.parameters())
    before = top1(model, test)
    widths = widths_for_flops(model, x, flops_ratio, groups=scope, round_to=round_to)
    callback = CentripetalSGDCallback(keep_ratio=widths, groups=scope, centripetal_strength=centripetal_strength,
                                      round_to=round_to, check_inputs={"pixel_values": test[0][:64]})
    train_set = Dataset.from_dict({"pixel_values": train[0].numpy(), "labels": train[1].numpy()}).with_format("torch")
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=batch_size,
                                 learning_rate=lr, optim="sgd", optim_args="momentum=0.9,nesterov=True",
                                 weight_decay=1e-4, max_grad_norm=0, lr_scheduler_type=schedule, report_to=[],
                                 save_strategy="no", logging_steps=max(1, steps // 8), use_cpu=True, seed=seed,
                                 disable_tqdm=True, dataloader_num_workers=0)
        start = time.perf_counter()
        Trainer(model=model, args=args, train_dataset=train_set, callbacks=[callback]).train()
        train_s = time.perf_counter() - start
    return {
        "method": "C-SGD" if scope == "all" else "C-SGD (internal)",
        "accuracy_before": before,
        "accuracy": top1(model, test),
        "flops_ratio": count_flops(model, x) / flops0,
        "params_ratio": sum(p.numel() for p in model.parameters()) / params0,
        "widths": callback.plan.widths,
        "trim_max_abs_output_diff": callback.slim_report["max_abs_output_diff"],
        "trim_max_abs_logit": callback.slim_report["max_abs_output"],
        "deviation_history": callback.deviation_history,
        "settings": {"flops_target": flops_ratio, "steps": steps, "lr": lr, "schedule": schedule, "scope": scope,
                     "centripetal_strength": centripetal_strength, "batch_size": batch_size, "round_to": round_to,
                     "optimizer": "SGD momentum 0.9 Nesterov, decay 1e-4 (inside the edit for clustered tensors)",
                     "seed": seed},
        "train_seconds": train_s,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flops", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=0.03)
    parser.add_argument("--strength", type=float, default=1.0)
    parser.add_argument("--scope", choices=["all", "internal"], default="all")
    parser.add_argument("--schedule", default="constant", help="Trainer lr_scheduler_type")
    parser.add_argument("--round-to", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="pruning_csgd")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from common import write_result

    write_result(args.out, run_csgd(flops_ratio=args.flops, steps=args.steps, lr=args.lr,
                                    centripetal_strength=args.strength, scope=args.scope, schedule=args.schedule,
                                    round_to=args.round_to))


if __name__ == "__main__":
    main()
