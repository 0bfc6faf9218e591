"""CoCoOp and MaPLe, the prompt-learning baselines, on the base-to-novel protocol of the main job.

usage: python examples/prompt_baselines_clip.py --method cocoop   (or maple; the bundled tiny CLIP, shapes)

Each method is trained with `Trainer` on 16 shots of the base classes through `CLIPZeroShotClassifier`, then tested
on base and novel classes against zero-shot CLIP; the adapter is saved, reloaded in a fresh `PeftModel` and checked
to score identically. CoCoOp runs the text tower once per image (cost ∝ images × classes); MaPLe prompts both towers.
On a real CLIP ViT-B/16 CoCoOp trains 35,360 numbers and MaPLe (depth 9) 3,555,072.
"""

from __future__ import annotations

import argparse


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=("cocoop", "maple"), default="cocoop")
    parser.add_argument("--dataset", default="shapes", help="a bundled classification set")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--output-dir", default=None, help="keep the adapter here (default: a removed temp folder)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    parse_args()  # --help answers before the heavy imports

import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from peft import PeftModel, get_peft_model  # noqa: E402
from transformers import PrinterCallback, Trainer, TrainingArguments, set_seed  # noqa: E402

from peft_effadapt import CLIPZeroShotClassifier, CoCoOpConfig, MaPLeConfig  # noqa: E402
from peft_effadapt.tasks import evaluate_base_to_novel  # noqa: E402
from peft_effadapt.testing import (  # noqa: E402
    base_novel_split,
    dataset_images,
    few_shot_split,
    load_tiny_clip,
    make_classification_dataset,
)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    clip, processor = load_tiny_clip()
    tokenizer, to_pixel_values = processor.tokenizer, processor.image_processor.to_pixel_values
    base_train, _ = base_novel_split(few_shot_split(make_classification_dataset(args.dataset, "train"), shots=16))
    base_test, novel_test = base_novel_split(make_classification_dataset(args.dataset, "test"))
    rows = [{"pixel_values": p, "labels": int(y)}
            for p, y in zip(to_pixel_values(dataset_images(base_train)), base_train["label"])]

    def evaluate(classifier):
        return evaluate_base_to_novel(classifier, base_test, novel_test, to_pixel_values)

    zero_shot = evaluate(CLIPZeroShotClassifier(clip, tokenizer, template="a photo of a {}.").eval())
    # MaPLe's depth J is capped by the tiny CLIP's layers; both start from "a photo of a"
    layers = clip.config.text_config.num_hidden_layers
    config = CoCoOpConfig() if args.method == "cocoop" else MaPLeConfig(prompt_depth=min(9, layers))
    set_seed(0)
    model = get_peft_model(clip, config.resolve_tokens(tokenizer))
    classifier = CLIPZeroShotClassifier(model, tokenizer, base_train.features["label"].names)
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(args.output_dir or scratch)
        training_args = TrainingArguments(
            output_dir=str(Path(scratch) / "trainer"), max_steps=args.steps, learning_rate=args.lr,
            per_device_train_batch_size=args.batch_size, optim="sgd", optim_args="momentum=0.9",
            lr_scheduler_type="cosine", weight_decay=5e-4, report_to=[], save_strategy="no", logging_strategy="no",
            disable_tqdm=True, dataloader_pin_memory=torch.cuda.is_available(), seed=0)
        trainer = Trainer(model=classifier, args=training_args, train_dataset=rows)
        trainer.remove_callback(PrinterCallback)
        trainer.train()
        trained = evaluate(classifier.eval())
        model.save_pretrained(out / args.method)
        reloaded = evaluate(CLIPZeroShotClassifier(PeftModel.from_pretrained(load_tiny_clip()[0], out / args.method),
                                                   tokenizer).eval())
    params = model.get_nb_trainable_parameters()[0]
    print(f"{'':12s} {'base':>6s} {'novel':>6s} {'HM':>6s}")
    for name, s in (("zero-shot", zero_shot), (args.method, trained), ("reloaded", reloaded)):
        print(f"{name:12s} {s['base']:6.1f} {s['novel']:6.1f} {s['hm']:6.1f}")
    print(f"{args.method}: {params} trained numbers; reloaded adapter scores "
          f"{'identically' if reloaded == trained else 'DIFFERENTLY'}")
    if reloaded != trained:
        raise SystemExit(1)
    return {"zero_shot": zero_shot, "trained": trained, "params": params}


if __name__ == "__main__":
    main()
