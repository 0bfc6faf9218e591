"""QPrompt on CLIP: `get_peft_model(clip, QPromptConfig(...))` + `Trainer`, base-to-novel on the bundled testbed.

usage: python examples/qprompt_clip.py [--dataset shapes] [--host coop] [--bits 1]   (the testbed's tiny CLIP)
       python examples/qprompt_clip.py --model openai/clip-vit-base-patch16 --dataset <hub dataset>

The same code runs on a real CLIP and a Hub dataset; only the loading lines change (see examples/rlp_clip.py). The
prompt is quantised in every forward (training and evaluation); the saved adapter holds b-bit packed indices and a
2^b-entry fp16 codebook: 1-bit QCoOp on ViT-B/16 (4 x 512 context) is 260 bytes of tensors.
"""

from __future__ import annotations

import argparse


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="shapes", help="a bundled set (shapes, clutter, drawings, ...) or, with "
                        "--model, a Hub dataset with 'image' and 'label' columns")
    parser.add_argument("--model", default=None, help="a Hub CLIP, e.g. openai/clip-vit-base-patch16")
    parser.add_argument("--host", default="coop", choices=["coop", "rlp", "maple"])
    parser.add_argument("--bits", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--output-dir", default=None)
    return parser.parse_args(argv)


if __name__ == "__main__":
    parse_args()  # --help and argument errors answer here, before the heavy imports below

import tempfile
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model
from safetensors import safe_open
from transformers import Trainer, TrainingArguments

import peft_effadapt  # noqa: F401  (registers QPrompt with peft)
from peft_effadapt import CLIPZeroShotClassifier, QPromptConfig
from peft_effadapt.tasks import evaluate_base_to_novel
from peft_effadapt.testing import base_novel_split, few_shot_split, load_clip, load_clip_with_data


def tensor_bytes(folder: str) -> int:
    with safe_open(Path(folder) / "adapter_model.safetensors", framework="pt") as handle:
        return sum(handle.get_tensor(k).numel() * handle.get_tensor(k).element_size() for k in handle.keys())  # noqa: SIM118


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    clip, tokenizer, to_pixel_values, images_of, train, test = load_clip_with_data(args.model, args.dataset)
    base_train, _ = base_novel_split(few_shot_split(train, shots=16, seed=0))
    base_test, novel_test = base_novel_split(test)
    evaluate = lambda clf: evaluate_base_to_novel(clf.eval(), base_test, novel_test, to_pixel_values)  # noqa: E731
    before = evaluate(CLIPZeroShotClassifier(clip, tokenizer, template="a photo of a {}."))

    # MaPLe's depth is capped by the number of encoder layers of the model (2 text layers in the tiny CLIP)
    depth = min(9, clip.config.text_config.num_hidden_layers, clip.config.vision_config.num_hidden_layers)
    config = QPromptConfig(ctx_init="a photo of a", host=args.host, bits=args.bits,
                           prompt_depth=depth).resolve_tokens(tokenizer)
    model = get_peft_model(clip, config)
    model.print_trainable_parameters()
    classifier = CLIPZeroShotClassifier(model, tokenizer, base_train.features["label"].names)
    data = Dataset.from_dict({"pixel_values": to_pixel_values(images_of(base_train)).numpy(),
                              "labels": np.asarray(base_train["label"])}).with_format("torch")
    out_dir = args.output_dir or tempfile.mkdtemp()
    lr = args.lr * (0.1 if args.host == "maple" else 1.0)
    training_args = TrainingArguments(output_dir=out_dir, max_steps=args.steps, per_device_train_batch_size=32,
                                      learning_rate=lr, optim="sgd", optim_args="momentum=0.9",
                                      lr_scheduler_type="cosine", weight_decay=5e-4, report_to=[],
                                      save_strategy="no", logging_steps=50, seed=0)
    Trainer(model=classifier, args=training_args, train_dataset=data).train()
    after = evaluate(classifier)
    print("codebook refits per tensor:", model.base_model.refit_counts())

    # saved: packed indices + fp16 codebook per quantised tensor (add save_latents=True to keep training later)
    model.save_pretrained(f"{out_dir}/adapter")
    fresh_clip = load_clip(args.model)[0]
    reloaded = CLIPZeroShotClassifier(PeftModel.from_pretrained(fresh_clip, f"{out_dir}/adapter"), tokenizer)
    reloaded_scores = evaluate(reloaded)
    for name, scores in (("zero-shot CLIP", before), ("QPrompt trained", after), ("QPrompt reloaded", reloaded_scores)):
        print(f"{name:16s} base {scores['base']:.1f}  novel {scores['novel']:.1f}  HM {scores['hm']:.1f}")
    print(f"adapter saved in {out_dir}/adapter: {tensor_bytes(f'{out_dir}/adapter')} bytes of tensors")


if __name__ == "__main__":
    main()
