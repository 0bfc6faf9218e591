"""QPrompt: CoOp vs QCoOp (1/2/4 bits) vs noise-CoOp vs RLP vs quantised RLP vs MaPLe vs QMaPLe, base-to-novel
(CoOp protocol, 16 shots) on bundled testbed sets with the bundled tiny CLIP.

usage: python benchmarks/qprompt.py [--sets clutter drawings shapes] [--steps 300] [--seeds 0] [--smoke]
Writes benchmarks/results/qprompt.json and qprompt.png (HM against stored bytes). One thread.

Training, splits and evaluation are those of benchmarks/rlp.py (imported, not copied): SGD momentum 0.9, weight decay
5e-4, cosine, batch 32; base = first ceil(C/2) classes (trained), novel = the rest, each evaluated as its own problem,
HM = 2BN/(B+N); the summary row is the HM of the mean base and mean novel accuracies. Stored bytes = tensor payload
of adapter_model.safetensors (what the adapter needs; fp32 for unquantised tensors as saved, plus the fp16 figure
the paper uses for hosts in `payload_fp16`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peft import get_peft_model  # noqa: E402
from plots import qprompt_figure  # noqa: E402
from rlp import TEMPLATE, load_model, train  # noqa: E402

import peft_effadapt  # noqa: E402,F401
from peft_effadapt import CLIPZeroShotClassifier, CoOpConfig, QPromptConfig, RLPConfig  # noqa: E402
from peft_effadapt.tasks import average_base_to_novel, evaluate_base_to_novel  # noqa: E402
from peft_effadapt.testing import base_novel_split, few_shot_split, make_classification_dataset  # noqa: E402

from common import RESULTS, write_result  # noqa: E402


def methods(tokenizer, noise_std: float, maple_lr_scale: float) -> dict:
    """name -> (config factory, lr multiplier)."""
    def q(**kw):
        return lambda: QPromptConfig(ctx_init="a photo of a", **kw).resolve_tokens(tokenizer)

    out = {
        "CoOp": (lambda: CoOpConfig(ctx_init="a photo of a").resolve_tokens(tokenizer), 1.0),
        "QCoOp 1b": (q(host="coop", bits=1), 1.0),
        "QCoOp 2b": (q(host="coop", bits=2), 1.0),
        "QCoOp 4b": (q(host="coop", bits=4), 1.0),
        "noise-CoOp": (q(host="coop", quantizer="noise", noise_std=noise_std), 1.0),
        "RLP": (lambda: RLPConfig(ctx_init="a photo of a", rank=1).resolve_tokens(tokenizer), 1.0),
        "QRLP 1b": (q(host="rlp", bits=1, rlp_rank=1), 1.0),
        "MaPLe": (q(host="maple", quantizer="none", prompt_depth=2), maple_lr_scale),
        "QMaPLe 4b": (q(host="maple", bits=4, prompt_depth=2), maple_lr_scale),
    }
    return out


def payload(model) -> tuple[int, int]:
    """(bytes of the saved tensors, the same with fp32 tensors counted as fp16)."""
    folder = Path(tempfile.mkdtemp())
    model.save_pretrained(folder)
    total = total16 = 0
    with safe_open(folder / "adapter_model.safetensors", framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118
            t = handle.get_tensor(key)
            total += t.numel() * t.element_size()
            total16 += t.numel() * (2 if t.dtype == torch.float32 else t.element_size())
    return total, total16


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sets", nargs="+", default=["clutter", "drawings", "shapes"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--maple-lr-scale", type=float, default=0.1,
                        help="MaPLe/QMaPLe lr = lr * this (its coupling matrices diverge at CoOp's lr)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--methods", nargs="+", default=None, help="subset of the method names")
    parser.add_argument("--smoke", action="store_true", help="random tiny CLIP, one set, few steps (code path only)")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.sets = 5, ["shapes"]
    torch.set_num_threads(1)
    model, tokenizer, to_pixels = load_model(args.smoke)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def base_model_fn():
        fresh = type(model)(model.config)
        fresh.load_state_dict(state)
        return fresh.eval()

    # noise std relative to the token-embedding scale as in the paper's s = 0.01 vs CLIP's embedding std ~0.02
    emb_std = float(model.text_model.embeddings.token_embedding.weight.std())
    noise_std = 0.5 * emb_std
    rows: dict[str, dict] = {}
    extra: dict[str, dict] = {}
    for name in args.sets:
        train_set = make_classification_dataset(name, "train")
        test_set = make_classification_dataset(name, "test")
        base_train, _ = base_novel_split(few_shot_split(train_set, shots=args.shots, seed=0))
        base_test, novel_test = base_novel_split(test_set)
        zs = CLIPZeroShotClassifier(base_model_fn(), tokenizer, template=TEMPLATE).eval()
        rows.setdefault("zero-shot CLIP", {})[name] = {
            **evaluate_base_to_novel(zs, base_test, novel_test, to_pixels), "bytes": 0, "bytes_fp16": 0}
        for method, (make_config, lr_scale) in methods(tokenizer, noise_std, args.maple_lr_scale).items():
            if args.methods and method not in args.methods:
                continue
            per_seed = []
            for seed in args.seeds:
                torch.manual_seed(seed)
                peft_model = get_peft_model(base_model_fn(), make_config())
                clf = CLIPZeroShotClassifier(peft_model, tokenizer, template=TEMPLATE)
                start = time.perf_counter()
                train(clf, base_train, to_pixels, args.steps, args.lr * lr_scale, args.batch, seed)
                seconds = time.perf_counter() - start
                res = evaluate_base_to_novel(clf, base_test, novel_test, to_pixels)
                res["bytes"], res["bytes_fp16"] = payload(peft_model)
                res["train_s"] = seconds
                if hasattr(peft_model.base_model, "refit_counts"):
                    extra.setdefault(method, {})[f"{name}/seed{seed}"] = peft_model.base_model.refit_counts()
                per_seed.append(res)
            rows.setdefault(method, {})[name] = {k: float(np.mean([r[k] for r in per_seed])) for k in per_seed[0]}
            print(f"{name:9s} {method:11s} " + " ".join(f"{k}={v:.1f}" for k, v in rows[method][name].items()),
                  flush=True)
    summary = {}
    for method, per in rows.items():
        first = next(iter(per.values()))
        summary[method] = {**average_base_to_novel(list(per.values())), "bytes": int(first["bytes"]),
                           "bytes_fp16": int(first["bytes_fp16"])}
    print("\n| method | base | novel | HM | stored bytes (fp16 for fp32 tensors) |\n|---|---|---|---|---|")
    for m, s in summary.items():
        print(f"| {m} | {s['base']:.1f} | {s['novel']:.1f} | {s['hm']:.1f} | {s['bytes']} ({s['bytes_fp16']}) |")
    claims = {}
    for host, quantised in (("CoOp", ["QCoOp 1b", "QCoOp 2b", "QCoOp 4b"]), ("RLP", ["QRLP 1b"]),
                            ("MaPLe", ["QMaPLe 4b"])):
        for q in quantised:
            if q not in summary or host not in summary:
                continue
            claims[f"{q} vs {host}"] = {
                "novel_gain": summary[q]["novel"] - summary[host]["novel"],
                "hm_gain": summary[q]["hm"] - summary[host]["hm"],
                "storage_ratio": summary[q]["bytes"] / max(summary[host]["bytes_fp16"], 1),
            }
    write_result("qprompt_smoke" if args.smoke else "qprompt", {
        "threads": 1, "args": vars(args), "noise_std": noise_std, "per_dataset": rows, "summary": summary,
        "claim_check": claims, "refits": extra,
        "note": "stored bytes = tensor payload of adapter_model.safetensors as saved (host methods save fp32); "
                "bytes_fp16 counts fp32 tensors at 2 bytes as the paper does; storage_ratio = quantised bytes / "
                "host fp16 bytes",
    })
    qprompt_figure({"summary": summary}, RESULTS / ("qprompt_smoke.png" if args.smoke else "qprompt.png"))


if __name__ == "__main__":
    main()
