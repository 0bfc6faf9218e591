"""RLP vs CoOp vs zero-shot CLIP, base-to-novel (CoOp protocol), 16 shots, on every bundled downstream set.

usage: python benchmarks/rlp.py [--steps 150] [--lr 0.01] [--seeds 0] [--smoke]
Writes benchmarks/results/rlp.json and rlp.png. One thread (torch.set_num_threads(1)).

Per dataset: classes sorted, base = first ceil(C/2) (trained, 16 shots each), novel = the rest (never seen);
each half is evaluated as its own problem with its own class names; HM = 2BN/(B+N); the summary row is the HM of
the mean base and mean novel accuracies. Also times a training step (RLP / CoOp / peft LoRA on the text tower,
same batch, interleaved) and inference after merge vs zero-shot CLIP.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peft import LoraConfig, get_peft_model  # noqa: E402

import peft_effadapt  # noqa: E402,F401
from peft_effadapt import CLIPZeroShotClassifier, CoOpConfig, RLPConfig  # noqa: E402
from peft_effadapt.tasks import average_base_to_novel, evaluate_base_to_novel  # noqa: E402
from peft_effadapt.testing import (  # noqa: E402
    CLASSIFICATION_SETS,
    base_novel_split,
    dataset_images,
    few_shot_split,
    make_classification_dataset,
)

from common import RESULTS, interleaved_medians  # noqa: E402

TEMPLATE = "a photo of a {}."


def load_model(smoke: bool):
    if not smoke:
        from peft_effadapt.testing import load_tiny_clip

        model, processor = load_tiny_clip()
        return model, processor.tokenizer, processor.image_processor.to_pixel_values
    # smoke: a random CLIP with the testbed's tokenizer, only to exercise the code path
    import tempfile

    from peft_effadapt.testing import ShapesImageProcessor, tiny_clip
    from peft_effadapt.testing.tokenizer import train_caption_tokenizer

    tok = train_caption_tokenizer(tempfile.mkdtemp())
    model = tiny_clip(text_config=dict(vocab_size=len(tok), max_position_embeddings=32, bos_token_id=0,
                                       eos_token_id=1, pad_token_id=1))
    return model, tok, ShapesImageProcessor().to_pixel_values


def methods(tokenizer):
    out = {"CoOp": lambda: CoOpConfig(ctx_init="a photo of a").resolve_tokens(tokenizer)}
    for r in (1, 2, 4):
        out[f"RLP r={r}"] = (lambda r=r: RLPConfig(ctx_init="a photo of a", rank=r).resolve_tokens(tokenizer))
    return out


def train(classifier, data, to_pixels, steps: int, lr: float, batch: int, seed: int) -> None:
    torch.manual_seed(seed)
    params = [p for p in classifier.parameters() if p.requires_grad]
    # SGD with momentum and cosine decay, as CoOp's recipe (lr scaled for the tiny model; see the README)
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    pixels = to_pixels(dataset_images(data))
    labels = torch.as_tensor(np.asarray(data["label"]))
    classifier.set_class_names(data.features["label"].names)
    classifier.train()
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = torch.as_tensor(rng.choice(len(labels), size=min(batch, len(labels)), replace=False))
        loss = classifier(pixels[idx], labels=labels[idx]).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    classifier.eval()


def stored_bytes(model, tmp: Path) -> int:
    model.save_pretrained(tmp)
    return (tmp / "adapter_model.safetensors").stat().st_size


def accuracy_table(args, base_model_fn, tokenizer, to_pixels):
    import tempfile

    rows = {}
    sets = ["shapes"] if args.smoke else sorted(CLASSIFICATION_SETS)
    for name in sets:
        train_set = make_classification_dataset(name, "train")
        test_set = make_classification_dataset(name, "test")
        base_train, _ = base_novel_split(few_shot_split(train_set, shots=args.shots, seed=0))
        base_test, novel_test = base_novel_split(test_set)
        clip = base_model_fn()
        zs = CLIPZeroShotClassifier(clip, tokenizer, template=TEMPLATE).eval()
        rows.setdefault("zero-shot CLIP", {})[name] = {
            **evaluate_base_to_novel(zs, base_test, novel_test, to_pixels), "params": 0, "bytes": 0}
        for method, make_config in methods(tokenizer).items():
            per_seed = []
            for seed in args.seeds:
                torch.manual_seed(seed)
                model = get_peft_model(base_model_fn(), make_config())
                clf = CLIPZeroShotClassifier(model, tokenizer, template=TEMPLATE)
                start = time.perf_counter()
                train(clf, base_train, to_pixels, args.steps, args.lr, args.batch, seed)
                seconds = time.perf_counter() - start
                res = evaluate_base_to_novel(clf, base_test, novel_test, to_pixels)
                res["params"] = model.get_nb_trainable_parameters()[0]
                res["bytes"] = stored_bytes(model, Path(tempfile.mkdtemp()))
                res["train_s"] = seconds
                per_seed.append(res)
            rows.setdefault(method, {})[name] = {k: float(np.mean([r[k] for r in per_seed])) for k in per_seed[0]}
            print(f"{name:9s} {method:14s} " + " ".join(f"{k}={v:.1f}" for k, v in rows[method][name].items()),
                  flush=True)
        print(f"{name:9s} zero-shot      " + " ".join(
            f"{k}={v:.1f}" for k, v in rows["zero-shot CLIP"][name].items()), flush=True)
    summary = {m: average_base_to_novel(list(per.values())) for m, per in rows.items()}
    return rows, summary


def speed(base_model_fn, tokenizer, to_pixels, repeats: int):
    """Training step (RLP / CoOp / LoRA r=4 on the text tower's q,v) on one batch, and merged inference."""
    data = make_classification_dataset("shapes", "test")
    names = data.features["label"].names
    pixels = to_pixels(dataset_images(data)[:32])
    labels = torch.as_tensor(np.asarray(data["label"][:32]))
    configs = {
        "RLP": RLPConfig(ctx_init="a photo of a").resolve_tokens(tokenizer),
        "CoOp": CoOpConfig(ctx_init="a photo of a").resolve_tokens(tokenizer),
        "LoRA": LoraConfig(r=4, target_modules=r"text_model\.encoder\.layers\.\d+\.self_attn\.(q_proj|v_proj)"),
    }
    steps = {}
    for key, config in configs.items():
        model = get_peft_model(base_model_fn(), config)
        clf = CLIPZeroShotClassifier(model, tokenizer, names, template=TEMPLATE)
        clf.train()
        opt = torch.optim.SGD([p for p in clf.parameters() if p.requires_grad], lr=1e-3)

        def step(clf=clf, opt=opt):
            clf(pixels, labels=labels).loss.backward()
            opt.step()
            opt.zero_grad()

        steps[key] = step
    train_times = interleaved_medians(steps, repeats)
    zero_shot = CLIPZeroShotClassifier(base_model_fn(), tokenizer, names, template=TEMPLATE).eval()
    merged_model = get_peft_model(base_model_fn(), configs["RLP"]).merge_and_unload()
    # a merged model is a plain CLIPModel: feed it the placeholder prompts it was merged for
    merged = CLIPZeroShotClassifier(merged_model, tokenizer, names, template=TEMPLATE).eval()
    merged.template = " ".join([configs["RLP"].placeholder_token] * configs["RLP"].n_ctx) + " {}."
    with torch.no_grad():
        infer = interleaved_medians({"zero-shot": lambda: zero_shot(pixels), "RLP merged": lambda: merged(pixels)},
                                    repeats)
    return {
        "train_step_s": train_times,
        "train_ratio_RLP_over_CoOp": train_times["RLP"] / train_times["CoOp"],
        "train_ratio_LoRA_over_CoOp": train_times["LoRA"] / train_times["CoOp"],
        "inference_s": infer,
        "inference_ratio_merged_over_zero_shot": infer["RLP merged"] / infer["zero-shot"],
    }


def plot(summary, rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods_ = list(summary)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    x = np.arange(len(methods_))
    for i, key in enumerate(("base", "novel", "hm")):
        ax.bar(x + (i - 1) * 0.27, [summary[m][key] for m in methods_], 0.27, label=key)
    ax.set_xticks(x, methods_)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("tiny CLIP, base-to-novel, 16 shots, mean over datasets")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="random tiny CLIP, one set, few steps (code path only)")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.repeats = 5, 3
    torch.set_num_threads(1)
    model, tokenizer, to_pixels = load_model(args.smoke)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def base_model_fn():
        fresh = type(model)(model.config)
        fresh.load_state_dict(state)
        return fresh.eval()

    rows, summary = accuracy_table(args, base_model_fn, tokenizer, to_pixels)
    timing = speed(base_model_fn, tokenizer, to_pixels, args.repeats)
    result = {"command": "python benchmarks/rlp.py " + " ".join(sys.argv[1:]), "threads": 1, "args": vars(args),
              "per_dataset": rows, "summary": summary, "speed": timing}
    name = "rlp_smoke" if args.smoke else "rlp"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print("\n| method | base | novel | HM | trainable params | stored bytes |\n|---|---|---|---|---|---|")
    for m, s in summary.items():
        per = next(iter(rows[m].values()))
        print(f"| {m} | {s['base']:.1f} | {s['novel']:.1f} | {s['hm']:.1f} | {int(per['params'])} | "
              f"{int(per['bytes'])} |")
    print(json.dumps(timing, indent=2))
    try:
        plot(summary, rows, RESULTS / f"{name}.png")
    except ImportError:
        print("matplotlib not installed: no plot")


if __name__ == "__main__":
    main()
