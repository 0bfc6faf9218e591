"""RLP on CLIP, the main job: does a 132-number prompt generalise to classes it never saw?

usage: python examples/rlp_clip.py [--dataset shapes] [--output-dir DIR]
       python examples/rlp_clip.py --model openai/clip-vit-base-patch16 --dataset <hub dataset>

Base-to-novel protocol (CoOp's): the classes are split in halves; CoOp and RLP are trained with `Trainer` on 16
shots of the base half only and then tested on both halves, each as its own problem (novel = classes never seen in
training); HM = 2·base·novel / (base + novel). Zero-shot CLIP with "a photo of a {}." is the reference both start
from. The RLP adapter is saved, reloaded with `PeftModel.from_pretrained` and checked to score identically. Adapters
go to --output-dir when given, else to a temporary folder that is removed at the end.

Defaults (bundled tiny CLIP, `shapes`: 4 base + 4 novel shapes, 128 test images per half) are the recipe of
`benchmarks/rlp.py` (SGD momentum 0.9, cosine, batch 32, lr 0.1, 300 steps, context "a photo of a", RLP rank 1).
On a real CLIP (ViT-B/16) RLP r=1 has 4·1 + 1·512 = 516 trained numbers and CoOp 4·512 = 2,048.
"""

from __future__ import annotations

import argparse


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="shapes", help="a bundled set (shapes, clutter, objects, drawings, colors,"
                        " textures) or, with --model, a Hub dataset with 'image' and 'label' columns")
    parser.add_argument("--model", default=None, help="a Hub CLIP, e.g. openai/clip-vit-base-patch16")
    parser.add_argument("--rank", type=int, default=1, help="RLP rank r (default 1)")
    parser.add_argument("--ctx-init", default="a photo of a", help="words the context starts from (n = their count)")
    parser.add_argument("--init", default="zero", choices=["zero", "svd", "random"],
                        help="RLP init: 'zero' (A = 0: starts as zero-shot CLIP), 'svd', 'random'")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=None, help="keep the adapters here (default: nothing is left behind)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    parse_args()  # --help and argument errors answer here, before the heavy imports below

import tempfile
import time
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from transformers import PrinterCallback, Trainer, TrainingArguments, set_seed

import peft_effadapt  # noqa: F401  (registers RLP and COOP with peft)
from peft_effadapt import CLIPZeroShotClassifier, CoOpConfig, RLPConfig
from peft_effadapt.tasks import evaluate_base_to_novel
from peft_effadapt.testing import base_novel_split, few_shot_split, load_clip, load_clip_with_data

TEMPLATE = "a photo of a {}."



def train(classifier, rows: list[dict], args, work_dir: Path) -> float:
    """Trains the adapter inside `classifier` with `Trainer`; returns the wall time in seconds."""
    training_args = TrainingArguments(
        output_dir=str(work_dir / "trainer"), max_steps=args.steps, per_device_train_batch_size=32,
        learning_rate=args.lr, optim="sgd", optim_args="momentum=0.9", lr_scheduler_type="cosine",
        weight_decay=5e-4, seed=args.seed, report_to=[], save_strategy="no", logging_strategy="no",
        disable_tqdm=True, dataloader_pin_memory=torch.cuda.is_available())
    trainer = Trainer(model=classifier, args=training_args, train_dataset=rows)
    trainer.remove_callback(PrinterCallback)  # the timing line below replaces Trainer's metrics dict
    start = time.perf_counter()
    trainer.train()
    classifier.eval()
    return time.perf_counter() - start


def adapter_bytes(model, folder: Path) -> int:
    model.save_pretrained(folder)
    return (folder / "adapter_model.safetensors").stat().st_size


def reading(scores: dict, rlp: str, n_test: int) -> str:
    zs, coop, ours = scores["zero-shot CLIP"], scores["CoOp"], scores[rlp]
    delta = lambda s, k: f"{s[k] - zs[k]:+.1f}"  # noqa: E731
    if ours["hm"] > zs["hm"]:
        verdict = f"RLP beats zero-shot CLIP on HM ({ours['hm']:.1f} vs {zs['hm']:.1f}"
    else:
        verdict = f"RLP does NOT beat zero-shot CLIP on HM here ({ours['hm']:.1f} vs {zs['hm']:.1f}"
    verdict += f"; base {delta(ours, 'base')}, novel {delta(ours, 'novel')})."
    versus = "stays above" if ours["hm"] > coop["hm"] else "is not above"
    return (f"Reading: {verdict} It {versus} CoOp (HM {coop['hm']:.1f}; base {delta(coop, 'base')}, novel "
            f"{delta(coop, 'novel')}) with {ours['params']} vs {coop['params']} trained numbers. One seed, {n_test} "
            f"test images per half (1 image = {100 / n_test:.1f} points): gaps of a few points are within noise.")


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    clip, tokenizer, to_pixel_values, images_of, train_set, test_set = load_clip_with_data(args.model, args.dataset)
    base_train, _ = base_novel_split(few_shot_split(train_set, shots=16, seed=0))
    base_test, novel_test = base_novel_split(test_set)
    pixels = to_pixel_values(images_of(base_train))
    rows = [{"pixel_values": p, "labels": int(y)} for p, y in zip(pixels, base_train["label"])]
    base_names = base_train.features["label"].names
    novel_names = novel_test.features["label"].names
    print(f"{args.dataset}: trained on {len(rows)} images of {len(base_names)} base classes ({', '.join(base_names)}); "
          f"novel classes never seen in training: {', '.join(novel_names)}")

    def evaluate(classifier):
        return evaluate_base_to_novel(classifier, base_test, novel_test, to_pixel_values)

    scores = {"zero-shot CLIP": {**evaluate(CLIPZeroShotClassifier(clip, tokenizer, template=TEMPLATE).eval()),
                                 "params": 0, "bytes": 0}}
    rlp = f"RLP r={args.rank}"
    configs = {"CoOp": CoOpConfig(ctx_init=args.ctx_init),
               rlp: RLPConfig(ctx_init=args.ctx_init, rank=args.rank, init=args.init)}
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(args.output_dir or scratch)
        for name, config in configs.items():
            set_seed(args.seed)  # RLP's B and the dropout masks are random: seed them for a reproducible run
            model = get_peft_model(clip if name == rlp else load_clip(args.model)[0], config.resolve_tokens(tokenizer))
            classifier = CLIPZeroShotClassifier(model, tokenizer, base_names)
            seconds = train(classifier, rows, args, Path(scratch))
            print(f"trained {name}: {args.steps} steps in {seconds:.0f} s")
            scores[name] = {**evaluate(classifier), "params": model.get_nb_trainable_parameters()[0],
                            "bytes": adapter_bytes(model, out / name.split()[0].lower())}

        # only A and B are stored; P0 is rebuilt from the base model's vocabulary when loading
        reloaded = PeftModel.from_pretrained(load_clip(args.model)[0], out / "rlp")
        again = evaluate(CLIPZeroShotClassifier(reloaded, tokenizer).eval())
        same = all(again[k] == scores[rlp][k] for k in ("base", "novel", "hm"))

        print(f"\n{'method':15s} {'trained':>8s} {'adapter':>9s} {'base':>6s} {'novel':>6s} {'HM':>6s}")
        for name, s in scores.items():
            size = f"{s['bytes']} B" if s["bytes"] else "-"
            print(f"{name:15s} {s['params']:8d} {size:>9s} {s['base']:6.1f} {s['novel']:6.1f} {s['hm']:6.1f}")
        print(f"reloaded RLP adapter: {'identical scores' if same else 'SCORES DIFFER: ' + str(again)}")
        print(reading(scores, rlp, min(len(base_test), len(novel_test))))
        if args.output_dir:
            print(f"adapters saved in {out}/rlp and {out}/coop")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
