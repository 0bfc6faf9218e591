"""PYRA's modulation taken apart: why PYRA loses to LoRA+ToMe at high compression on the ViT.

The `pyra_vit` claim pairs PYRA high with LoRA+ToMe high: the same merge schedule (equal FLOPs), the same LoRA, the
two differing only in PYRA's modulation (W_r, W_D and its LayerNorm), which LoRA+ToMe keeps frozen at the identity.
The claim's arms train the modulation at the shared learning rate, as the official runs effectively did (their
separate `--pyra_lr` never took effect). These arms train it at a tenth and a hundredth of that rate (`pyra_lr`), on
the same seeds; `pyra_modulation_rows` sets each against LoRA+ToMe high and against PYRA high at the shared rate.

    python benchmarks/claims.py --experiments pyra_modulation --seeds $(seq 0 19)   # then pyra_modulation.md
"""

from __future__ import annotations

from claim_stats import paired

# arm -> the modulation's learning rate as a fraction of the shared one
PYRA_LR_FACTORS = {"PYRA high, modulation at lr/10": 0.1, "PYRA high, modulation at lr/100": 0.01}
SHARED_LR_ARM = "PYRA high (modulation at the shared lr)"


def run_pyra_modulation(arm: str, seed: int, s: dict) -> dict:
    from claim_experiments import run_pyra

    return run_pyra("vit")("PYRA high", seed, {**s, "pyra_lr": s["lr"] * PYRA_LR_FACTORS[arm]})


def pyra_modulation_rows(data: dict, min_seeds: int) -> list[dict]:
    """Accuracy of PYRA high on the ViT per modulation learning rate, paired with LoRA+ToMe high and PYRA high."""
    claim = data.get("pyra_vit", {})
    arms = [(SHARED_LR_ARM, claim.get("PYRA high", {}))]
    arms += [(arm, data.get("pyra_modulation", {}).get(arm, {})) for arm in PYRA_LR_FACTORS]
    baselines = {"lora_tome": claim.get("LoRA+ToMe high", {}), "shared_lr": claim.get("PYRA high", {})}
    rows = []
    for arm, runs in arms:
        accuracy = {s: m["accuracy"] for s, m in runs.items()}
        row = {"arm": arm, "seeds": len(runs), "accuracy": sum(accuracy.values()) / len(runs) if runs else None}
        for name, base in baselines.items():
            stats = paired(accuracy, {s: m["accuracy"] for s, m in base.items()}, min_seeds)
            row[f"vs_{name}"] = {k: stats[k] for k in ("n", "mean_difference", "ci95", "verdict")}
        rows.append(row)
    return rows


def pyra_modulation_markdown(rows: list[dict]) -> str:
    def cell(stats: dict) -> str:
        if stats["mean_difference"] is None or not stats["ci95"]:
            return "–"
        ci = stats["ci95"]
        return f"{stats['mean_difference']:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}] {stats['verdict']}"

    lines = ["| PYRA high on the ViT | seeds | accuracy | vs LoRA+ToMe high | vs PYRA high at the shared lr |",
             "|---|---|---|---|---|"]
    for r in rows:
        accuracy = "–" if r["accuracy"] is None else f"{r['accuracy']:.2f}"
        shared = "–" if r["arm"] == SHARED_LR_ARM else cell(r["vs_shared_lr"])
        lines.append(f"| {r['arm']} | {r['seeds']} | {accuracy} | {cell(r['vs_lora_tome'])} | {shared} |")
    return "\n".join(lines) + "\n"
