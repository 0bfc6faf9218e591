"""MaPLe's recipe taken apart: why MaPLe loses to CoCoOp on the shared recipe.

The shared recipe of the claims table trains every prompt arm for 300 steps of 32 images at lr 0.1, i.e. 150 passes
over the 64 base-class training images; MaPLe's own recipe (prompt_recipes.py) makes 5 passes of batch 4 at its
scaled lr. The arms move one knob of one recipe towards the other: MaPLe's own recipe trained for 20, 50 and 150
epochs, and the shared recipe cut to MaPLe's 5 epochs (10 steps) or run at a tenth of the lr (qprompt.py's MaPLe lr).
`maple_rows` sets each against CoCoOp on the shared and on its own recipe (paired by seed).
"""

from __future__ import annotations

from claim_stats import paired

# arm -> (the recipe it starts from, what changes)
MAPLE_VARIANTS = {
    "MaPLe, own recipe, 20 epochs": ("own", {"epochs": 20}),
    "MaPLe, own recipe, 50 epochs": ("own", {"epochs": 50}),
    "MaPLe, own recipe, 150 epochs": ("own", {"epochs": 150}),  # the shared recipe's passes over the data
    "MaPLe, shared recipe, 5 epochs": ("shared", {"steps": 10}),  # MaPLe's 5 epochs at batch 32
    "MaPLe, shared recipe, lr 0.01": ("shared", {"lr": 0.01}),  # qprompt.py's MaPLe lr (x0.1)
}


def run_maple_variant(arm: str, seed: int, s: dict) -> dict:
    from claim_experiments import run_prompt, run_prompt_own

    recipe, change = MAPLE_VARIANTS[arm]
    if recipe == "own":
        out = run_prompt_own("MaPLe", seed, s, epochs=change["epochs"])
        if out["recipe"]["epochs"] != min(change["epochs"], s["epochs_cap"] or change["epochs"]):
            raise RuntimeError(f"{arm}: trained {out['recipe']['epochs']} epochs, not {change['epochs']}")
        return out
    return run_prompt("MaPLe", seed, {**s, **change})


def maple_rows(data: dict, min_seeds: int) -> list[dict]:
    """MaPLe's HM (base, novel) per recipe variant and its paired difference to CoCoOp on each recipe."""
    arms = [("MaPLe, shared recipe (150 epochs, batch 32, lr 0.1)", data.get("prompts", {}).get("MaPLe", {})),
            ("MaPLe, own recipe (5 epochs, batch 4, lr 0.175)", data.get("prompts_own", {}).get("MaPLe", {}))]
    arms += [(arm, data.get("maple_recipe", {}).get(arm, {})) for arm in MAPLE_VARIANTS]
    cocoop = {"shared": data.get("prompts", {}).get("CoCoOp", {}), "own": data.get("prompts_own", {}).get("CoCoOp", {})}
    rows = []
    for arm, runs in arms:
        row = {"arm": arm, "seeds": len(runs)}
        for key in ("base", "novel", "hm"):
            row[key] = sum(m[key] for m in runs.values()) / len(runs) if runs else None
        for recipe, base in cocoop.items():
            stats = paired({s: m["hm"] for s, m in runs.items()}, {s: m["hm"] for s, m in base.items()}, min_seeds)
            row[f"hm_vs_cocoop_{recipe}"] = {k: stats[k] for k in ("n", "mean_difference", "ci95", "verdict")}
        rows.append(row)
    return rows


def maple_markdown(rows: list[dict]) -> str:
    def cell(stats: dict) -> str:
        if stats["mean_difference"] is None:
            return "–"
        ci = stats["ci95"]
        return f"{stats['mean_difference']:+.2f}" + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}] {stats['verdict']}" if ci else "")

    lines = ["| MaPLe trained with | seeds | base | novel | HM | HM vs CoCoOp, shared recipe | HM vs CoCoOp, own recipe |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        nums = " | ".join("–" if r[k] is None else f"{r[k]:.1f}" for k in ("base", "novel", "hm"))
        lines.append(f"| {r['arm']} | {r['seeds']} | {nums} | {cell(r['hm_vs_cocoop_shared'])} | "
                     f"{cell(r['hm_vs_cocoop_own'])} |")
    return "\n".join(lines) + "\n"
