"""RLP on CLIP: `get_peft_model(clip, RLPConfig(...))` + `Trainer`, base-to-novel on the bundled testbed.

usage: python examples/rlp_clip.py            (the testbed's tiny CLIP; about a minute on a laptop CPU)

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

import tempfile

import numpy as np
import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model
from transformers import Trainer, TrainingArguments

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


def main() -> None:
    torch.set_num_threads(1)
    clip, processor = load_tiny_clip()
    tokenizer, to_pixel_values = processor.tokenizer, processor.image_processor.to_pixel_values

    train_set = few_shot_split(make_classification_dataset("objects", "train"), shots=16, seed=0)
    base_train, _ = base_novel_split(train_set)
    base_test, novel_test = base_novel_split(make_classification_dataset("objects", "test"))

    zero_shot = CLIPZeroShotClassifier(clip, tokenizer, template="a photo of a {}.").eval()
    print("zero-shot CLIP:", evaluate_base_to_novel(zero_shot, base_test, novel_test, to_pixel_values))

    # n = 4 from "a photo of a", rank 1: the model starts exactly as zero-shot CLIP with that template
    config = RLPConfig(ctx_init="a photo of a", rank=1, lowrank_dropout=0.1).resolve_tokens(tokenizer)
    model = get_peft_model(clip, config)
    model.print_trainable_parameters()
    classifier = CLIPZeroShotClassifier(model, tokenizer, base_train.features["label"].names)

    data = Dataset.from_dict({
        "pixel_values": to_pixel_values(dataset_images(base_train)).numpy(),
        "labels": np.asarray(base_train["label"]),
    }).with_format("torch")
    out_dir = tempfile.mkdtemp()
    args = TrainingArguments(output_dir=out_dir, max_steps=150, per_device_train_batch_size=32, learning_rate=0.01,
                             optim="sgd", lr_scheduler_type="cosine", weight_decay=5e-4, report_to=[],
                             save_strategy="no", use_cpu=True, logging_steps=50, seed=0)
    Trainer(model=classifier, args=args, train_dataset=data).train()

    classifier.eval()
    print("RLP:", evaluate_base_to_novel(classifier, base_test, novel_test, to_pixel_values))

    # only A and B are stored; P0 is rebuilt from the base model's vocabulary when loading
    model.save_pretrained(f"{out_dir}/adapter")
    reloaded = PeftModel.from_pretrained(load_tiny_clip()[0], f"{out_dir}/adapter")
    novel = CLIPZeroShotClassifier(reloaded, tokenizer, novel_test.features["label"].names).eval()
    pixels = to_pixel_values(dataset_images(novel_test)[:8])
    print("novel-class predictions after reload:", [novel.class_names[i] for i in novel.predict(pixels)])


if __name__ == "__main__":
    main()
