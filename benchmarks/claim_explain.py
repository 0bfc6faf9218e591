"""Why a claim is not supported on the testbed: power against the paper's effect, the own-recipe rerun, the ablations.

Every clause quotes a measured figure: `power` compares the paper's reported effect with the observed spread of the
paired differences (paired t, two-sided 0.05, power 0.8); `recipe` quotes the verdict when both arms train on their
own papers' recipes; the LFTL clause quotes the component ablation (lftl_ablation.py).
"""

from __future__ import annotations

import statistics

from claim_stats import detectable_effect, seeds_needed

MAX_SEEDS = 20  # seeds run where a run costs under a minute
UNDECIDED = ("inconclusive", "contradicted")


def power(stats: dict, paper: float | None, source: str) -> dict:
    """The paired spread of `stats` (a `claim_stats.paired` result) against the paper's effect `paper`."""
    out = {"paper_effect": paper, "paper_source": source}
    if stats["n"] < 2:
        return out
    sd = statistics.stdev(stats["differences"])
    out.update(sd=sd, detectable_at_n=detectable_effect(stats["n"], sd))
    if paper:
        out["seeds_needed"] = seeds_needed(paper, sd)
    return out


def _ci(stats: dict) -> str:
    lo, hi = stats["ci95"]
    return f"{stats['mean_difference']:+.2f} [{lo:+.2f}, {hi:+.2f}]"


def power_clause(stats: dict, p: dict) -> str:
    n, sd = stats["n"], p.get("sd")
    if sd is None:
        return ""
    if p["paper_effect"] is None:
        return (f"power: no paper effect recovered; {n} seeds at sd {sd:.2f} would detect a true difference of "
                f"{p['detectable_at_n']:.2f} points")
    need, paper, top = p["seeds_needed"], p["paper_effect"], stats["ci95"][1]
    head = f"power: the paper's {paper:+.2f} needs {need} paired seeds at sd {sd:.2f}, {n} run"
    if need > n:
        return head + f" (underpowered{'; capped at ' + str(MAX_SEEDS) if n >= MAX_SEEDS else ''})"
    if top < 0:
        return head + f": the interval lies below 0 (top {top:+.2f}), the opposite of the paper's sign"
    if top < paper:
        return head + f": the interval's top {top:+.2f} excludes it, the testbed effect is smaller"
    return head + ": the paper's effect is still inside the interval"


def recipe_clause(own: dict | None) -> str:
    if not own or own["n"] < 2:
        return "own recipe: pending"
    return f"own recipe: {_ci(own)} {own['verdict']} ({own['n']} seeds)"


def _against(rows: dict, arm: str, baseline: str, key: str) -> dict | None:
    """`arm` - `baseline` on `key` ("round1" or "aubc") from ablation rows, which pair every arm with contrastive
    and margin (difference and verdict turned round when only baseline - arm is stored)."""
    if f"{key}_vs_{baseline}" in rows.get(arm, {}):
        return rows[arm][f"{key}_vs_{baseline}"]
    stats = rows.get(baseline, {}).get(f"{key}_vs_{arm}")
    if not stats or stats["mean_difference"] is None:
        return None
    ci = stats["ci95"] and [-stats["ci95"][1], -stats["ci95"][0]]
    flipped = {"supported": "contradicted", "contradicted": "supported"}.get(stats["verdict"], stats["verdict"])
    return {**stats, "mean_difference": -stats["mean_difference"], "ci95": ci, "verdict": flipped}


def lftl_clause(ablation: dict | None, baseline: str) -> str:
    """The component ablation on the claim's fixed pool (round 1) and the claim redone on pools drawn per seed."""
    fixed = {r["arm"]: r for r in (ablation or {}).get("fixed_pool", [])}
    pools = {r["arm"]: r for r in (ablation or {}).get("pool_per_seed", [])}
    parts = []
    for label, arm in (("contrastive", "contrastive"), ("class balance off", "contrastive, no class balance"),
                       ("contrast off", "contrastive, no contrast"), ("VPA off", "contrastive, no VPA")):
        stats = _against(fixed, arm, "margin", "round1")
        if stats and stats["ci95"]:
            parts.append(f"{label} {_ci(stats)}")
    out = ("fixed pool, round 1 vs margin: " + ", ".join(parts) + " (lftl_ablation.md; the round-1 query is the "
           "same images for every seed)") if parts else ""
    for key, label in (("round1", "round 1"), ("aubc", "mean over rounds")):
        stats = _against(pools, "contrastive", baseline, key)
        if stats and stats["ci95"]:
            out += f"; pools drawn per seed, {label}: {_ci(stats)} {stats['verdict']} ({stats['n']} pools)"
    return out.lstrip("; ")


def maple_clause(rows: list[dict] | None) -> str:
    """MaPLe's HM against CoCoOp's (same recipe) for each MaPLe recipe variant that has runs."""
    parts = []
    for r in (rows or [])[2:]:  # the first two rows are the table's own columns
        stats = r["hm_vs_cocoop_shared"] if "shared recipe" in r["arm"] else r["hm_vs_cocoop_own"]
        if stats["ci95"]:
            parts.append(f"{r['arm'].removeprefix('MaPLe, ')} {_ci(stats)}")
    return ("recipe diagnostic (maple_recipe.md), MaPLe - CoCoOp HM on the same recipe: " + ", ".join(parts)
            if parts else "")


def pyra_clause(rows: list[dict] | None) -> str:
    """PYRA high against LoRA+ToMe high for each modulation learning rate that has runs."""
    parts = [f"{r['arm'].removeprefix('PYRA high, ')} {_ci(r['vs_lora_tome'])}" for r in (rows or [])[1:]
             if r["vs_lora_tome"]["ci95"]]
    return ("modulation diagnostic (pyra_modulation.md), PYRA high - LoRA+ToMe high: " + ", ".join(parts)
            if parts else "")


def why(row: dict, ablation: dict | None = None, maple: list[dict] | None = None,
        pyra: list[dict] | None = None) -> str | None:
    """One line for a row whose same- or own-recipe verdict is inconclusive or contradicted (None otherwise)."""
    own = row.get("own_recipe")
    if row["verdict"] not in UNDECIDED and not (own and own["verdict"] in UNDECIDED):
        return None
    clauses = []
    if row["experiment"] == "lftl":
        clauses.append(lftl_clause(ablation, row["baseline"]))
    if (row["arm"], row["baseline"]) == ("MaPLe", "CoCoOp"):
        clauses.append(maple_clause(maple))
    if (row["experiment"], row["arm"]) == ("pyra_vit", "PYRA high"):
        clauses.append(pyra_clause(pyra))
    if "own_recipe" in row:
        clauses.append(recipe_clause(own))
    clauses.append(power_clause(row, row["power"]))
    return "; ".join(c for c in clauses if c)
