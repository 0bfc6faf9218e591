"""RLP on CLIP: `get_peft_model(clip, RLPConfig(...))` + `Trainer`, base-to-novel on the bundled testbed.

usage: python examples/rlp_clip.py [--dataset shapes]   (the testbed's tiny CLIP; about a minute on a laptop CPU)
       python examples/rlp_clip.py --model openai/clip-vit-base-patch16 --dataset <hub dataset>

The same code runs on a real CLIP and a Hub dataset; only the loading lines change:

    from transformers import CLIPModel, CLIPProcessor
    clip = CLIPModel.from_pretrained("openai/clip-vit-base-patch16")
    processor = CLIPProcessor.from_pretrained("openai/clip-vit-base-patch16")
    tokenizer = processor.tokenizer
    to_pixel_values = lambda images: processor(images=list(images), return_tensors="pt")["pixel_values"]
    dataset = datasets.load_dataset("<an image-classification dataset with a ClassLabel column>")
    # then few_shot_split / base_novel_split as below (any datasets.Dataset with 'image' and 'label' columns)

With ViT-B/16 the adapter has 4 * 1 + 1 * 512 = 516 trainable parameters and a 2 KB adapter file.
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model
from transformers import Trainer, TrainingArguments, set_seed

import peft_effadapt  # noqa: F401  (registers RLP with peft)
from peft_effadapt import CLIPZeroShotClassifier, RLPConfig
from peft_effadapt.tasks import evaluate_base_to_novel
from peft_effadapt.testing import (
    base_novel_split,
    dataset_images,
    few_shot_split,
    load_tiny_clip,
    make_classification_dataset,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="shapes", help="a bundled set (shapes, clutter, objects, drawings, ...)"
                        " or, with --model, a Hub dataset with 'image' and 'label' columns")
    parser.add_argument("--model", default=None, help="a Hub CLIP, e.g. openai/clip-vit-base-patch16")
    parser.add_argument("--rank", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--output-dir", default=None)
    return parser.parse_args(argv)


def load(args):
    """(clip, tokenizer, images -> pixel_values, train set, test set) for the bundled testbed or the Hub."""
    if args.model is None:
        clip, processor = load_tiny_clip()
        train = make_classification_dataset(args.dataset, "train")
        test = make_classification_dataset(args.dataset, "test")
        return clip, processor.tokenizer, processor.image_processor.to_pixel_values, dataset_images, train, test
    from datasets import load_dataset
    from transformers import CLIPModel, CLIPProcessor

    clip, processor = CLIPModel.from_pretrained(args.model), CLIPProcessor.from_pretrained(args.model)
    data = load_dataset(args.dataset)
    to_pixel_values = lambda images: processor(images=list(images), return_tensors="pt")["pixel_values"]  # noqa: E731
    pil_images = lambda dataset: [image.convert("RGB") for image in dataset["image"]]  # noqa: E731
    return clip, processor.tokenizer, to_pixel_values, pil_images, data["train"], data["test"]


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    clip, tokenizer, to_pixel_values, images_of, train, test = load(args)

    base_train, _ = base_novel_split(few_shot_split(train, shots=16, seed=0))
    base_test, novel_test = base_novel_split(test)
    evaluate = lambda clf: evaluate_base_to_novel(clf, base_test, novel_test, to_pixel_values)  # noqa: E731

    zero_shot = CLIPZeroShotClassifier(clip, tokenizer, template="a photo of a {}.").eval()
    before = evaluate(zero_shot)

    # n = 4 from "a photo of a", rank 1: the model starts exactly as zero-shot CLIP with that template
    config = RLPConfig(ctx_init="a photo of a", rank=args.rank, lowrank_dropout=0.1).resolve_tokens(tokenizer)
    set_seed(0)  # the low-rank factor A is initialised randomly: seed it for a reproducible run
    model = get_peft_model(clip, config)
    model.print_trainable_parameters()
    classifier = CLIPZeroShotClassifier(model, tokenizer, base_train.features["label"].names)

    data = Dataset.from_dict({
        "pixel_values": to_pixel_values(images_of(base_train)).numpy(),
        "labels": np.asarray(base_train["label"]),
    }).with_format("torch")
    out_dir = args.output_dir or tempfile.mkdtemp()
    training_args = TrainingArguments(output_dir=out_dir, max_steps=args.steps, per_device_train_batch_size=32,
                                      learning_rate=args.lr, optim="sgd", optim_args="momentum=0.9",
                                      lr_scheduler_type="cosine", weight_decay=5e-4, report_to=[],
                                      save_strategy="no", logging_steps=50, seed=0)
    Trainer(model=classifier, args=training_args, train_dataset=data).train()
    classifier.eval()
    after = evaluate(classifier)

    # only A and B are stored; P0 is rebuilt from the base model's vocabulary when loading
    model.save_pretrained(f"{out_dir}/adapter")
    base_model = load(args)[0]
    reloaded = CLIPZeroShotClassifier(PeftModel.from_pretrained(base_model, f"{out_dir}/adapter"), tokenizer).eval()
    reloaded_scores = evaluate(reloaded)
    for name, scores in (("zero-shot CLIP", before), ("RLP trained", after), ("RLP reloaded", reloaded_scores)):
        print(f"{name:15s} base {scores['base']:.1f}  novel {scores['novel']:.1f}  HM {scores['hm']:.1f}")
    print(f"adapter saved in {out_dir}/adapter")


if __name__ == "__main__":
    main()
