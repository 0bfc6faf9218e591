"""Fine-tune a ViT with Consolidator under `transformers.Trainer`, then consolidate, reload and merge.

Real checkpoint (GPU recommended; the paper's VTAB recipe uses lr 1e-3..1e-2, 100 epochs, batch 64):

    python examples/consolidator_vit.py --model google/vit-base-patch16-224-in21k --dataset cifar100 \
        --image-column img --label-column fine_label --epochs 10 --batch-size 64 --lr 1e-3 --bf16

Bundled tiny ViT and a generated downstream set (no Hub; runtime: `benchmarks/runtimes.py`):

    python examples/consolidator_vit.py --tiny

Several processes (Accelerate places devices; the Trainer handles DDP):

    accelerate launch --num_processes 2 examples/consolidator_vit.py --tiny               # 2 GPUs
    accelerate launch --multi_gpu --num_processes 2 examples/consolidator_vit.py --tiny --cpu   # 2 CPU processes

(On a CPU-only machine `accelerate launch --cpu --num_processes 2` starts a single process; `--multi_gpu` with
`--cpu`, i.e. `TrainingArguments(use_cpu=True)`, starts two processes that all-reduce over gloo.)
"""

from __future__ import annotations

import argparse


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="bundled tiny ViT + generated data, no Hub access")
    parser.add_argument("--model", default="google/vit-base-patch16-224-in21k")
    parser.add_argument("--dataset", default="cifar100", help="Hub dataset, or a testbed set name with --tiny")
    parser.add_argument("--image-column", default="img")
    parser.add_argument("--label-column", default="fine_label")
    parser.add_argument("--train-size", type=int, default=1000, help="VTAB-1k style: 800 train + 200 val")
    parser.add_argument("--fc-groups", type=int, nargs="*", default=None, help="default: hidden_size // 2")
    parser.add_argument("--channel-shuffle", action="store_true")
    parser.add_argument("--rep-drop", type=float, default=0.0)
    parser.add_argument("--epochs", type=float, default=None)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast through Accelerate")
    parser.add_argument("--output-dir", default="outputs/consolidator_vit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu", action="store_true", help="train on CPU (gloo all-reduce under accelerate launch)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    parse_args()  # --help and argument errors answer here, before the heavy imports below

import os
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForImageClassification, Trainer, TrainingArguments

import peft_effadapt  # noqa: F401  (registers the PEFT types with peft)
from peft_effadapt import ConsolidatorConfig


def load_tiny(args):
    from peft_effadapt.testing import checkpoint_path, make_classification_dataset
    from peft_effadapt.testing.processing import ShapesImageProcessor

    name = args.dataset if args.dataset != "cifar100" else "drawings"
    train = make_classification_dataset(name, "train")
    test = make_classification_dataset(name, "test")
    labels = train.features["label"].names
    path = checkpoint_path("tiny_vit")
    model = AutoModelForImageClassification.from_pretrained(
        path, num_labels=len(labels), id2label=dict(enumerate(labels)), ignore_mismatched_sizes=True
    )
    processor = ShapesImageProcessor.from_pretrained(path)

    def transform(batch):
        return {"pixel_values": processor.to_pixel_values(np.asarray(batch["image"], dtype=np.uint8)),
                "labels": torch.as_tensor(batch["label"])}

    return model, train.with_transform(transform), test.with_transform(transform), labels


def load_hub(args):
    from datasets import load_dataset
    from transformers import AutoImageProcessor

    data = load_dataset(args.dataset)
    train = data["train"].shuffle(seed=args.seed).select(range(min(args.train_size, len(data["train"]))))
    test = data["test"] if "test" in data else data["validation"]
    labels = train.features[args.label_column].names
    model = AutoModelForImageClassification.from_pretrained(
        args.model, num_labels=len(labels), id2label=dict(enumerate(labels)), ignore_mismatched_sizes=True
    )
    processor = AutoImageProcessor.from_pretrained(args.model)

    def transform(batch):
        images = [image.convert("RGB") for image in batch[args.image_column]]
        return {"pixel_values": processor(images=images, return_tensors="pt")["pixel_values"],
                "labels": torch.as_tensor(batch[args.label_column])}

    return model, train.with_transform(transform), test.with_transform(transform), labels


def accuracy(eval_prediction) -> dict[str, float]:
    logits, labels = eval_prediction
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def main(argv=None):
    args = parse_args(argv)
    model, train, test, labels = (load_tiny if args.tiny else load_hub)(args)

    config = ConsolidatorConfig(
        fc_groups=args.fc_groups,
        channel_shuffle=args.channel_shuffle,
        rep_drop=args.rep_drop,
        modules_to_save=["classifier"],
    )
    model = get_peft_model(model, config)
    model.print_trainable_parameters()

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        num_train_epochs=args.epochs if args.epochs is not None else (8 if args.tiny else 10),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=max(args.batch_size, 64),
        learning_rate=args.lr if args.lr is not None else (5e-3 if args.tiny else 1e-3),
        weight_decay=args.weight_decay,
        warmup_steps=0.1,
        lr_scheduler_type="cosine",
        bf16=args.bf16,
        eval_strategy="no",
        save_strategy="no",
        logging_steps=10,
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        seed=args.seed,
        use_cpu=args.cpu,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train, eval_dataset=test,
                      compute_metrics=accuracy)
    print(f"training in {training_args.world_size} process(es)")
    before = trainer.evaluate()["eval_accuracy"]
    trainer.train()
    after = trainer.evaluate()["eval_accuracy"]

    adapter_dir = Path(args.output_dir) / "adapter"
    model.consolidate()  # stage 1: the branches become one sparse delta per layer (training checkpoints keep branches)
    if trainer.is_world_process_zero():
        model.save_pretrained(adapter_dir)  # only the consolidated delta values are stored
    trainer.accelerator.wait_for_everyone()
    size = (adapter_dir / "adapter_model.safetensors").stat().st_size
    base = (load_tiny if args.tiny else load_hub)(args)[0]
    reloaded = PeftModel.from_pretrained(base, adapter_dir)
    merged = reloaded.merge_and_unload()  # stage 2: a plain ViT again, base FLOPs and latency
    # every process evaluates its shard (the Trainer gathers), so this runs on all ranks, not only on rank 0
    merged_trainer = Trainer(model=merged, args=training_args, eval_dataset=test, compute_metrics=accuracy)
    merged_accuracy = merged_trainer.evaluate()["eval_accuracy"]
    if trainer.is_world_process_zero():
        print(f"accuracy before {before:.4f} | after {after:.4f} | reloaded+merged {merged_accuracy:.4f} | "
              f"adapter file {size / 1024:.1f} KiB in {adapter_dir}")
        merged.save_pretrained(Path(args.output_dir) / "merged")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
