"""Prune a ResNet with C-SGD (Centripetal SGD): train with the callback, trim losslessly, save and reload.

Bundled tiny ResNet on the generated `source` shapes domain (no Hub; runtime: `benchmarks/runtimes.py`):

    python examples/csgd_resnet.py --flops 0.5

Under 2 CPU processes (gloo; `--multi_gpu` makes accelerate use torchrun, `use_cpu` keeps it on the CPU):

    accelerate launch --multi_gpu --num_processes 2 examples/csgd_resnet.py --batch-size 32

The script measures accuracy, picks per-group widths for the FLOPs target (one uniform keep ratio over internal and
residual groups), trains with `CentripetalSGDCallback` (SGD, Nesterov momentum 0.9: C-SGD's optimizer), which makes
the filters of each cluster identical and trims the model in place at train end after checking that the outputs
did not change; then it saves the slimmed model with its plan and reloads it with `load_slimmed`.
"""

from __future__ import annotations

import argparse


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flops", type=float, default=0.5, help="target FLOPs as a fraction of the model's")
    parser.add_argument("--steps", type=int, default=480)
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    parser.add_argument("--lr", type=float, default=0.03)
    parser.add_argument("--strength", type=float, default=1.0, help="centripetal strength eps (lr-scaled)")
    parser.add_argument("--round-to", type=int, default=1, help="keep widths at multiples of this")
    parser.add_argument("--train-per-class", type=int, default=None)
    parser.add_argument("--output-dir", default="csgd_out")
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


if __name__ == "__main__":
    parse_args()  # --help and argument errors answer here, before the heavy imports below

from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

import peft_effadapt  # noqa: F401
from peft_effadapt.pruning import CentripetalSGDCallback, count_flops, load_slimmed, widths_for_flops
from peft_effadapt.testing import classifier_accuracy, dataset_images, load_tiny_resnet, make_domain_dataset


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model, processor = load_tiny_resnet()
    train = make_domain_dataset("source", "train", n_per_class=args.train_per_class)
    test = make_domain_dataset("source", "test")
    train_set = Dataset.from_dict({"pixel_values": processor.to_pixel_values(dataset_images(train)).numpy(),
                                   "labels": np.asarray(train["label"])}).with_format("torch")
    probe = processor.to_pixel_values(dataset_images(test)[:64])
    x = probe[:1]
    flops0 = count_flops(model, x)
    acc0 = classifier_accuracy(model, test, processor)

    widths = widths_for_flops(model, x, args.flops, round_to=args.round_to)
    out = Path(args.output_dir)
    callback = CentripetalSGDCallback(keep_ratio=widths, centripetal_strength=args.strength, round_to=args.round_to,
                                      check_inputs={"pixel_values": probe}, save_dir=str(out / "slimmed"))
    training = TrainingArguments(output_dir=str(out / "run"), max_steps=args.steps,
                                 per_device_train_batch_size=args.batch_size, learning_rate=args.lr, optim="sgd",
                                 optim_args="momentum=0.9,nesterov=True", max_grad_norm=0,
                                 lr_scheduler_type="constant", report_to=[], save_strategy="no",
                                 logging_steps=max(1, args.steps // 6), use_cpu=True, seed=0, disable_tqdm=True,
                                 dataloader_num_workers=0)
    trainer = Trainer(model=model, args=training, train_dataset=train_set, callbacks=[callback])
    trainer.train()  # clusters -> centripetal training -> in-place trim (equivalence-checked) -> save_slimmed
    if not trainer.is_world_process_zero():
        return
    model.eval()
    print(f"cluster deviation during training: {[f'{s}:{d:.1e}' for s, d in callback.deviation_history]}")
    print(f"trim: largest member gap {callback.slim_report['max_gap']:.2e}, "
          f"max |logit change| {callback.slim_report['max_abs_output_diff']:.2e}")
    print(f"widths: {callback.plan.widths}")
    print(f"FLOPs ratio {count_flops(model, x) / flops0:.3f} (target {args.flops})")
    print(f"accuracy before {acc0:.4f}  after C-SGD {classifier_accuracy(model, test, processor):.4f}")
    reloaded = load_slimmed(out / "slimmed")
    with torch.no_grad():
        same = torch.equal(reloaded(pixel_values=probe).logits, model(pixel_values=probe).logits)
    print(f"reloaded from {out / 'slimmed'}: identical logits = {same}")


if __name__ == "__main__":
    main()
