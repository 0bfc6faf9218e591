"""LFTL: target accuracy vs labelling budget for contrastive, entropy, margin and random sampling (+ source-only).

Bundled testbed: the tiny ResNet trained on the source shapes domain adapts to the shifted target domain (pool =
target train split, accuracy on the held-out target test split) with LFTL's VPA rounds; only the query strategy
changes between curves. Writes benchmarks/results/lftl.json and lftl.png.

    python benchmarks/lftl.py                       # 3 seeds, 5 rounds of 2 % of a 512-image pool
    python benchmarks/lftl.py --seeds 0 --rounds 3  # quicker
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plots import lftl_figure  # noqa: E402

from peft_effadapt import ActiveAdaptationLoop, ImagePreprocess, LFTLConfig  # noqa: E402
from peft_effadapt.testing import load_source_classifier, make_domain_dataset  # noqa: E402

from common import RESULTS, write_result  # noqa: E402

SAMPLERS = ("contrastive", "entropy", "margin", "random")


def run_one(sampler: str, seed: int, pool, test, cfg_kwargs: dict) -> list[dict]:
    """The loop's per-round records, each with `labelled_per_class`: labels bought so far, per true class."""
    model, processor = load_source_classifier()
    cfg = LFTLConfig(seed=seed, **cfg_kwargs)
    with tempfile.TemporaryDirectory() as out:
        loop = ActiveAdaptationLoop(model, pool, out, config=cfg, sampler=sampler,
                                    preprocess=ImagePreprocess(processor),
                                    train_preprocess=ImagePreprocess(processor, hflip=True),
                                    eval_dataset=test, show_progress=False)
        history = loop.run()
        counts = [0] * loop.num_classes
        for record in history:
            labels = Path(out) / f"round_{record['round']:03d}" / "labels.json"
            for label in json.loads(labels.read_text())["labels"] if record["round"] else []:
                counts[label] += 1
            record["labelled_per_class"] = list(counts)
        return history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS)
    parser.add_argument("--pool-per-class", type=int, default=64, help="target train images per class (pool)")
    parser.add_argument("--test-per-class", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ratio", type=float, default=0.02, help="fraction of the pool labelled per round")
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pool = make_domain_dataset("target", "train", n_per_class=args.pool_per_class)
    test = make_domain_dataset("target", "test", n_per_class=args.test_per_class)
    cfg = dict(num_rounds=args.rounds, ratio_per_round=args.ratio, epochs_per_round=args.epochs, lr=args.lr,
               class_balance_topk=100)
    runs: dict[str, dict[int, list[dict]]] = {}
    start = time.perf_counter()
    for sampler in args.samplers:
        for seed in args.seeds:
            t0 = time.perf_counter()
            runs.setdefault(sampler, {})[seed] = history = run_one(sampler, seed, pool, test, cfg)
            print(f"{sampler:12s} seed {seed}: " + " ".join(f"{r['accuracy']:.3f}" for r in history)
                  + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    budgets = [r["num_labelled"] for r in next(iter(next(iter(runs.values())).values()))]
    summary = {}
    for sampler, by_seed in runs.items():
        per_round = list(zip(*[[r["accuracy"] for r in h] for h in by_seed.values()]))
        per_class = list(zip(*[[r["mean_class_accuracy"] for r in h] for h in by_seed.values()]))
        summary[sampler] = {"accuracy_mean": [statistics.mean(v) for v in per_round],
                            "accuracy_std": [statistics.pstdev(v) for v in per_round],
                            "mean_class_accuracy_mean": [statistics.mean(v) for v in per_class],
                            "area_under_budget_curve": statistics.mean(statistics.mean(v) for v in per_round[1:])}
    source = summary[args.samplers[0]]["accuracy_mean"][0]
    summary["source-only"] = {"accuracy_mean": [source] * len(budgets)}
    runs_json = {s: {str(k): v for k, v in by_seed.items()} for s, by_seed in runs.items()}
    png = lftl_figure({"runs": runs_json, "setting": {"seeds": args.seeds}}, RESULTS / "lftl.png")
    write_result("lftl", {
        "setting": {"pool": len(pool), "test": len(test), "seeds": args.seeds, **cfg},
        "budgets": budgets, "summary": summary,
        "runs": runs_json, "total_seconds": round(time.perf_counter() - start, 1), "plot": str(png)})


if __name__ == "__main__":
    main()
