"""Benchmark figures with matplotlib (the `bench` extra): one PNG per figure, error bars from the seeds.

    python benchmarks/plots.py     # re-render every PNG from the result JSONs in benchmarks/results

    from plots import errorbar_plot
    errorbar_plot("results/x.png", {"ours": [(1, 50.0, 1.2), (2, 70.0, 0.8)]}, xlabel="budget", ylabel="accuracy")

A series is a list of (x, mean, sd) points (sd 0 or None: no bar); points are drawn sorted by x and joined.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
Point = tuple  # (x, mean, sd or None)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _draw(ax, series: dict[str, list[Point]], xlabel: str, ylabel: str, title: str, log_x: bool) -> None:
    for name, points in series.items():
        points = sorted(points, key=lambda p: p[0])
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        errs = [p[2] or 0.0 for p in points]
        ax.errorbar(xs, ys, yerr=errs if any(errs) else None, marker="o", capsize=3, label=name)
    if log_x:
        ax.set_xscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def errorbar_plot(path: str | Path, series: dict[str, list[Point]], xlabel: str, ylabel: str, title: str = "",
                  log_x: bool = False) -> Path:
    """One axes, one line with error bars per series, written as PNG."""
    if not series or not any(series.values()):
        raise ValueError("errorbar_plot needs at least one series with points.")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    _draw(ax, series, xlabel, ylabel, title, log_x)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- per-benchmark figures (from the result JSONs) --------------------------------------------------------------------
def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def pyra_figure(section: dict, path: Path, model: str) -> Path:
    """Accuracy (%) against MFLOPs per image: LoRA alone, then the low/high schedules of LoRA+ToMe and PYRA."""
    families: dict[str, list[Point]] = {}
    for name, summary in section["methods"].items():
        family = "LoRA + ToMe" if name.startswith("lora+tome") else "PYRA" if name.startswith("pyra") else "LoRA"
        mean, sd = _mean_sd([100 * r["accuracy"] for r in summary["runs"]])
        families.setdefault(family, []).append((summary["gflops"] * 1e3, mean, sd))
    for family in ("LoRA + ToMe", "PYRA"):  # both curves start at the unmerged LoRA point
        families[family] = families.get(family, []) + families.get("LoRA", [])
    seeds = len(next(iter(section["methods"].values()))["runs"])
    return errorbar_plot(path, families, "MFLOPs per image (merged, eager)", f"test accuracy on {section['task']} (%)",
                         f"PYRA vs LoRA + ToMe ({model}, {seeds} seeds)")


def lftl_figure(result: dict, path: Path) -> Path:
    series = {}
    for sampler, by_seed in result["runs"].items():
        histories = list(by_seed.values())
        budgets = [r["num_labelled"] for r in histories[0]]
        series[sampler] = [(b, *_mean_sd([100 * h[i]["accuracy"] for h in histories])) for i, b in enumerate(budgets)]
    return errorbar_plot(path, series, "labelled target samples", "target test accuracy (%)",
                         f"LFTL on the testbed shift ({len(result['setting']['seeds'])} seeds)")


def qprompt_figure(result: dict, path: Path) -> Path:
    groups = {"CoOp family": ["CoOp", "QCoOp 4b", "QCoOp 2b", "QCoOp 1b"], "RLP family": ["RLP", "QRLP 1b"],
              "MaPLe family": ["MaPLe", "QMaPLe 4b"], "noise-CoOp": ["noise-CoOp"]}
    summary = result["summary"]
    series = {g: [(max(summary[m]["bytes_fp16"], 1), summary[m]["hm"], None) for m in ms if m in summary]
              for g, ms in groups.items()}
    return errorbar_plot(path, {g: p for g, p in series.items() if p}, "stored bytes (fp16 for unquantised tensors)",
                         "HM (%)", "tiny CLIP base-to-novel: HM vs stored bytes (1 seed)", log_x=True)


def pruning_figure(result: dict, path: Path) -> Path:
    rows = result["rows"]
    series: dict[str, list[Point]] = {}
    for row in rows[1:]:
        if row.get("accuracy") is not None:
            series.setdefault(row["method"], []).append((row["flops_ratio"], 100 * row["accuracy"], None))
    for points in series.values():
        points.append((1.0, 100 * rows[0]["accuracy"], None))
    return errorbar_plot(path, series, "remaining FLOPs fraction", "source test accuracy (%)",
                         "tiny ResNet: accuracy vs FLOPs (1 seed)")


# -- figures of benchmarks/claims.py ----------------------------------------------------------------------------------
def claims_plots(result: dict, out: Path) -> list[Path]:
    """accuracy vs FLOPs (PYRA / LoRA+ToMe, pruning), HM vs stored bytes (prompt methods), accuracy vs labelling
    budget (LFTL), R-Sum vs GMACs (TempMe); error bars = sd over the seeds of each arm."""
    arms = result["arm_summaries"]
    written = []

    def stat(summary, key, scale=1.0):
        return summary[key]["mean"] * scale, summary[key]["sd"] * scale

    def n_seeds(name):
        return max((len(s["seeds"]) for s in arms.get(name, {}).values()), default=0)

    plt = _pyplot()
    pyra = [n for n in ("pyra_vit", "pyra_clip") if n in arms]
    if pyra:
        fig, axes = plt.subplots(1, len(pyra), figsize=(6.4 * len(pyra), 4.2), squeeze=False)
        for ax, name in zip(axes[0], pyra):
            series: dict[str, list[Point]] = {}
            for arm, summary in arms[name].items():
                family = arm.rsplit(" ", 1)[0]
                series.setdefault(family, []).append((summary["gflops"]["mean"] * 1e3, *stat(summary, "accuracy")))
            _draw(ax, series, "MFLOPs per image (merged)", "test accuracy (%)",
                  f"{name}: PYRA vs LoRA+ToMe ({n_seeds(name)} seeds)", False)
        written.append(_save(plt, fig, out / "claims_pyra.png"))
    simple = {
        "prompts": ("bytes_fp16", "hm", "stored bytes (fp16 for unquantised tensors)", "HM (%)", True),
        "tempme": ("gmacs_per_video", "t2v_R-Sum", "GMACs per video (tiny vision tower)", "text->video R-Sum", False),
        "pruning": ("flops_ratio", "accuracy", "remaining FLOPs fraction", "source test accuracy (%)", False),
        "consolidator": ("trainable", "accuracy", "trainable parameters", "test accuracy (%)", False),
    }
    for name, (x_key, y_key, xlabel, ylabel, log_x) in simple.items():
        if name not in arms:
            continue
        series = {arm: [(max(s[x_key]["mean"], 1e-9), *stat(s, y_key))] for arm, s in arms[name].items()}
        written.append(errorbar_plot(out / f"claims_{name}.png", series, xlabel, ylabel,
                                     f"{name} ({n_seeds(name)} seeds)", log_x=log_x))
    if "lftl" in arms:
        series = {}
        for arm, s in arms["lftl"].items():
            rounds = sorted((k for k in s if k.startswith("accuracy_round")), key=lambda k: int(k[14:]))
            budgets = s.get("budgets") or list(range(len(rounds)))
            series[arm] = [(b, *stat(s, k)) for b, k in zip(budgets, rounds)]
        written.append(errorbar_plot(out / "claims_lftl.png", series, "labelled target samples",
                                     "target test accuracy (%)", f"LFTL sampling ({n_seeds('lftl')} seeds)"))
    return written


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    """Re-renders the figures of the per-method benchmarks from their JSONs (and claims.json, if present)."""
    def load(name):
        path = RESULTS / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else None

    if pyra := load("pyra"):
        for key, file, model in (("accuracy_vs_flops", "pyra.png", "tiny ViT"),
                                 ("accuracy_vs_flops_clip", "pyra_clip.png", "tiny CLIP vision tower")):
            if key in pyra:
                print(pyra_figure(pyra[key], RESULTS / file, model))
    for name, figure in (("lftl", lftl_figure), ("qprompt", qprompt_figure), ("pruning_accuracy", pruning_figure)):
        if data := load(name):
            print(figure(data, RESULTS / f"{name}.png"))
    if claims := load("claims"):
        print(claims_plots(claims, RESULTS))


if __name__ == "__main__":
    main()
