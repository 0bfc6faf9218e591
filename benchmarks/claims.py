"""Every paper claim re-tested as a paired comparison over seeds, with a 95 % confidence interval and a verdict.

    python benchmarks/claims.py                      # run what is missing (5 seeds), then write the table
    python benchmarks/claims.py --jobs 4             # the same with 4 worker processes (1 thread each)
    python benchmarks/claims.py --experiments prompts pyra_vit --seeds 0 1 2
    python benchmarks/claims.py --experiments prompts --arms CoOp "RLP r=1"   # the two arms of one claim
    python benchmarks/claims.py --table-only         # only recompute claims.json / the table / plots from the runs
    python benchmarks/claims.py --quick              # one seed of each arm (CI); add --size small for a cut-down run

Each (experiment, arm, seed) run is cached as a small JSON file under benchmarks/results/claims_runs/ (committed),
so the table can be completed over several sittings and machines; a cached run is reused only when its settings
equal the current ones. Both arms of a claim share seeds (the seed sets the few-shot draw, the new head, the data
order), splits, steps and budget. Writes benchmarks/results/claims.json, the Markdown table (claims.md) and the
plots (claims_*.png, with `bench` extra's matplotlib).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from claim_experiments import EXPERIMENTS, FULL, SMALL  # noqa: E402
from claim_explain import power, why  # noqa: E402
from claim_list import CLAIMS, Claim  # noqa: E402, F401 - Claim re-exported
from claim_stats import MIN_SEEDS, paired  # noqa: E402
from lftl_ablation import ablation_markdown, ablation_table  # noqa: E402
from maple_recipe import maple_markdown, maple_rows  # noqa: E402
from pyra_modulation import pyra_modulation_markdown, pyra_modulation_rows  # noqa: E402

from common import RESULTS, machine  # noqa: E402

RUNS = RESULTS / "claims_runs"


# cheapest first: what finishes early fills the table early
ORDER = ("prompts", "prompts_own", "consolidator", "pyra_vit", "pyra_clip", "tempme", "pruning", "lftl",
         "maple_recipe", "pyra_modulation", "lftl_ablation", "lftl_pools", "lftl_budget", "lftl_queries")


def run_path(runs: Path, experiment: str, arm: str, seed: int) -> Path:
    slug = "".join(c if c.isalnum() else "_" for c in arm).strip("_")
    return runs / experiment / slug / f"seed{seed}.json"


def load_run(runs: Path, experiment: str, arm: str, seed: int, settings: dict) -> dict | None:
    path = run_path(runs, experiment, arm, seed)
    if not path.exists():
        return None
    run = json.loads(path.read_text())
    return run if run.get("settings") == settings else None


def execute(job: tuple) -> tuple:
    """Runs one (experiment, arm, seed) in this process (1 thread) and writes its JSON; errors are written too."""
    import torch

    runs, name, arm, seed, size = job
    torch.set_num_threads(1)
    experiment = EXPERIMENTS[name]
    settings = experiment.settings[size]
    if load_run(Path(runs), name, arm, seed, settings) is not None:  # done meanwhile by another process
        return job, True
    path = run_path(Path(runs), name, arm, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    error = path.with_suffix(".error.json")
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        metrics = experiment.run(arm, seed, settings)
    except Exception as err:  # noqa: BLE001 - one failing arm must not stop the others; the error is kept
        error.write_text(json.dumps({"experiment": name, "arm": arm, "seed": seed, "error": repr(err)[:2000],
                                     "traceback": traceback.format_exc()[-4000:]}, indent=1) + "\n")
        print(f"FAILED {name} / {arm} / seed {seed}: {err!r}", flush=True)
        return job, False
    payload = {"experiment": name, "arm": arm, "seed": seed, "size": size, "settings": settings,
               "seconds": round(time.perf_counter() - start, 1),
               "cpu_seconds": round(time.process_time() - cpu_start, 1), "machine": machine(), "metrics": metrics}
    path.write_text(json.dumps(payload, indent=1) + "\n")
    error.unlink(missing_ok=True)
    print(f"done {name} / {arm} / seed {seed} in {payload['seconds']} s", flush=True)
    return job, True


def missing_jobs(runs: Path, experiments: list[str], seeds: list[int], size: str,
                 arms: list[str] | None = None) -> list[tuple]:
    jobs = []
    for seed in seeds:  # seed-major: every arm of a seed before the next seed, so partial runs stay paired
        for name in experiments:
            experiment = EXPERIMENTS[name]
            for arm in experiment.arms:
                if arms and arm not in arms:
                    continue
                if load_run(runs, name, arm, seed, experiment.settings[size]) is None:
                    jobs.append((str(runs), name, arm, seed, size))
    return jobs


def collect(runs: Path, size: str) -> dict[str, dict[str, dict[int, dict]]]:
    """experiment -> arm -> seed -> metrics, for every cached run with the current settings."""
    out: dict[str, dict[str, dict[int, dict]]] = {}
    for name, experiment in EXPERIMENTS.items():
        for arm in experiment.arms:
            folder = run_path(runs, name, arm, 0).parent
            for path in sorted(folder.glob("seed*.json")) if folder.exists() else []:
                if path.name.endswith(".error.json"):
                    continue
                run = json.loads(path.read_text())
                if run.get("settings") == experiment.settings[size]:
                    out.setdefault(name, {}).setdefault(arm, {})[run["seed"]] = run["metrics"]
    return out


def analyse(runs: Path, size: str, min_seeds: int = MIN_SEEDS) -> dict:
    data = collect(runs, size)
    experiments = {n: {"description": e.description, "arms": list(e.arms), "settings": e.settings[size]}
                   for n, e in EXPERIMENTS.items()}
    ablation = ablation_table(data, experiments, min_seeds)
    maple = maple_rows(data, min_seeds)
    pyra = pyra_modulation_rows(data, min_seeds)
    rows = []
    for claim in CLAIMS:
        arms = data.get(claim.experiment, {})
        stats = paired(_metric(arms, claim.arm, claim.metric), _metric(arms, claim.baseline, claim.metric), min_seeds)
        row = {"claim": claim.name, "experiment": claim.experiment, "arm": claim.arm, "baseline": claim.baseline,
               "metric": claim.metric, **stats}
        if claim.own:  # both arms on their own papers' recipes
            own = data.get(claim.own, {})
            row["own_recipe"] = {"experiment": claim.own, **paired(_metric(own, claim.arm, claim.metric),
                                                                     _metric(own, claim.baseline, claim.metric),
                                                                     min_seeds)}
        if claim.experiment == "lftl":  # the same comparison at every round
            rounds = sorted(k for k in next(iter(arms.values()), {}).get(0, {}) if k.startswith("accuracy_round"))
            row["per_round"] = {k: paired(_metric(arms, claim.arm, k), _metric(arms, claim.baseline, k), min_seeds)
                                for k in rounds}
        row["power"] = power(stats, claim.paper, claim.source)
        row["why"] = why(row, ablation, maple, pyra)
        errors = [json.loads(p.read_text())["error"] for name in (claim.experiment, claim.own) if name
                  for arm in (claim.arm, claim.baseline)
                  for p in sorted(run_path(runs, name, arm, 0).parent.glob("*.error.json"))]
        if errors:
            row["errors"] = errors[:3]
        rows.append(row)
    summaries = {name: {arm: _summary(seeds) for arm, seeds in arms.items()} for name, arms in data.items()}
    return {"size": size, "min_seeds": min_seeds, "experiments": experiments, "claims": rows,
            "lftl_ablation": ablation, "maple_recipe": maple, "pyra_modulation": pyra,
            "arm_summaries": summaries}


def _metric(arms: dict[str, dict[int, dict]], arm: str, key: str) -> dict[int, float]:
    return {seed: metrics[key] for seed, metrics in arms.get(arm, {}).items()}


def _summary(by_seed: dict[int, dict]) -> dict:
    """Mean and sd over seeds of every number the runs share (runs made before a metric was added lack it)."""
    import statistics

    runs = list(by_seed.values())
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and all(k in m for m in runs)]
    out = {"seeds": sorted(by_seed), **{k: v for k, v in runs[0].items() if isinstance(v, list)}}  # e.g. budgets
    for k in keys:
        values = [m[k] for m in runs]
        out[k] = {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}
    return out


def fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:+.2f}"


def _cell(stats: dict | None) -> tuple[str, str]:
    """('n: difference [95 % CI]', verdict) of a paired comparison."""
    if stats is None:
        return "n/a", "n/a"
    ci = stats["ci95"]
    return fmt(stats["mean_difference"]) + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else ""), stats["verdict"]


def table(result: dict) -> str:
    """The claims table: the shared-recipe verdict (as before), the own-recipe verdict, power and the reason."""
    lines = ["| claim | arm vs baseline | metric | seeds | mean difference [95 % CI] | verdict | own recipe: seeds | "
             "own recipe: mean difference [95 % CI] | own recipe: verdict | paper's effect | seeds for 80 % power | "
             "why |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["claims"]:
        diff, verdict = _cell(row)
        own = row.get("own_recipe")
        own_diff, own_verdict = _cell(own)
        p = row.get("power", {})
        paper = "–" if p.get("paper_effect") is None else f"{p['paper_effect']:+.2f}"
        needed = str(p["seeds_needed"]) if "seeds_needed" in p else "–"
        lines.append(f"| {row['claim']} | {row['arm']} vs {row['baseline']} | {row['metric']} | {row['n']} | "
                     f"{diff} | {verdict} | {own['n'] if own else 'n/a'} | {own_diff} | {own_verdict} | {paper} | "
                     f"{needed} | {row.get('why') or ''} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiments", nargs="+", default=list(ORDER), choices=list(EXPERIMENTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(MIN_SEEDS)))
    parser.add_argument("--quick", action="store_true", help="seed 0 only (one run of each arm)")
    parser.add_argument("--size", default=FULL, choices=[FULL, SMALL], help="small: cut-down data/steps (CI)")
    parser.add_argument("--arms", nargs="+", default=None, help="only these arms (e.g. the two of one claim)")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes, 1 thread each")
    parser.add_argument("--runs-dir", type=Path, default=RUNS)
    parser.add_argument("--out", type=Path, default=None, help="folder of claims.json/claims.md/plots "
                        "(default benchmarks/results; small runs default to --runs-dir)")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    seeds = [0] if args.quick else args.seeds
    out = args.out or (RESULTS if args.size == FULL else args.runs_dir)
    start = time.perf_counter()
    if not args.table_only:
        import torch

        torch.set_num_threads(1)
        jobs = missing_jobs(args.runs_dir, args.experiments, seeds, args.size, args.arms)
        print(f"{len(jobs)} runs to do", flush=True)
        for name in dict.fromkeys(job[1] for job in jobs):  # data built once, before the workers fork
            experiment = EXPERIMENTS[name]
            if experiment.prepare is not None:
                experiment.prepare(experiment.settings[args.size], sorted({job[3] for job in jobs}))
        if args.jobs > 1 and len(jobs) > 1:
            with multiprocessing.get_context("fork").Pool(args.jobs, maxtasksperchild=4) as pool:
                for _ in pool.imap_unordered(execute, jobs):
                    pass
        else:
            for job in jobs:
                execute(job)
    result = analyse(args.runs_dir, args.size, min_seeds=1 if args.quick else MIN_SEEDS)
    result["command"] = "python benchmarks/claims.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result["wall_seconds_this_invocation"] = round(time.perf_counter() - start, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "claims.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "claims.md").write_text(table(result))
    (out / "lftl_ablation.json").write_text(json.dumps(result["lftl_ablation"], indent=1) + "\n")
    (out / "lftl_ablation.md").write_text(ablation_markdown(result["lftl_ablation"]))
    (out / "maple_recipe.md").write_text(maple_markdown(result["maple_recipe"]))
    (out / "pyra_modulation.md").write_text(pyra_modulation_markdown(result["pyra_modulation"]))
    print(table(result))
    if not args.no_plots:
        try:
            from plots import claims_plots

            claims_plots(result, out)
        except ImportError as err:
            print(f"no plots ({err}); install the `bench` extra for matplotlib")
    return result


if __name__ == "__main__":
    main()
