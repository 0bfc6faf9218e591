"""benchmarks/claims.py: the paired statistics behind each verdict, the run cache, and (slow) a cut-down --quick run."""

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from claim_explain import power, why  # noqa: E402
from claim_stats import detectable_effect, paired, paired_power, seeds_needed, t975  # noqa: E402
from claims import CLAIMS, EXPERIMENTS, load_run, main, run_path, table  # noqa: E402
from lftl_ablation import ABLATION_ARMS, POOL_ARMS, QUERY_ARMS, ablation_rows, components, query_rows  # noqa: E402
from maple_recipe import MAPLE_VARIANTS, maple_markdown, maple_rows  # noqa: E402
from prompt_recipes import ARM_RECIPE, LR_SCALE, RECIPES, epoch_lr, scaled  # noqa: E402
from pyra_modulation import PYRA_LR_FACTORS, pyra_modulation_markdown, pyra_modulation_rows  # noqa: E402


def test_paired_t_interval_by_hand():
    # differences 1..5: mean 3, sd sqrt(2.5), half width t(0.975, 4) * sd / sqrt(5) = 2.776 * 0.70711
    out = paired({s: 10.0 + s + 1 for s in range(5)}, {s: 10.0 for s in range(5)})
    half = 2.776 * math.sqrt(2.5) / math.sqrt(5)
    assert out["n"] == 5 and out["mean_difference"] == pytest.approx(3.0)
    assert out["ci95"] == pytest.approx([3.0 - half, 3.0 + half])
    assert out["verdict"] == "supported"


def test_verdicts_follow_the_interval_and_the_seed_count():
    base = {s: 50.0 for s in range(5)}
    assert paired({s: 48.0 - 0.1 * s for s in range(5)}, base)["verdict"] == "contradicted"
    assert paired({s: 50.0 + (-1) ** s for s in range(5)}, base)["verdict"] == "inconclusive"
    four = paired({s: 60.0 + s for s in range(4)}, base)  # only 4 paired seeds: no verdict yet
    assert four["verdict"] == "pending" and four["n"] == 4 and four["ci95"] is not None
    unpaired = paired({0: 60.0, 7: 61.0}, base)  # seed 7 has no baseline run: only seed 0 pairs
    assert unpaired["seeds"] == [0] and unpaired["verdict"] == "pending" and unpaired["ci95"] is None
    assert t975(1) == 12.706 and t975(100) == 1.96
    with pytest.raises(ValueError, match="df >= 1"):
        t975(0)


def test_every_claim_names_arms_of_its_experiment():
    for claim in CLAIMS:
        for name in filter(None, (claim.experiment, claim.own)):
            arms = EXPERIMENTS[name].arms
            assert claim.arm in arms and claim.baseline in arms, (claim.name, name)
        assert claim.source and (claim.paper is None or claim.paper > 0), claim.name  # every effect says its source
    assert set(EXPERIMENTS["prompts_own"].arms) == set(ARM_RECIPE)
    assert {"contrastive", "margin"} <= set(ABLATION_ARMS) & set(POOL_ARMS)


def test_paired_t_power_matches_textbook_sample_sizes():
    # Cohen's d = 1 and 0.5 need 10 and 34 pairs for 80 % power at two-sided 0.05 (noncentral t, as G*Power)
    assert seeds_needed(1.0, 1.0) == 10 and seeds_needed(0.5, 1.0) == 34 and seeds_needed(-1.0, 1.0) == 10
    assert paired_power(10, 1.0, 1.0) == pytest.approx(0.803, abs=1e-3)
    assert paired_power(9, 1.0, 1.0) < 0.8 <= paired_power(10, 1.0, 1.0)
    effect = detectable_effect(10, 2.0)  # the inverse: the smallest effect 10 seeds detect at sd 2
    assert paired_power(10, effect, 2.0) == pytest.approx(0.8, abs=1e-6) and seeds_needed(effect, 2.0) == 10
    with pytest.raises(ValueError, match="zero effect"):
        seeds_needed(0.0, 1.0)


def test_own_recipes_keep_the_papers_batch_epochs_and_scale_every_lr_alike():
    coop, cocoop, maple = (scaled(RECIPES[n], n_train=64, text_layers=2) for n in ("CoOp", "CoCoOp", "MaPLe"))
    assert (coop["batch"], coop["steps_per_epoch"], coop["steps"], coop["n_ctx"], coop["depth"]) == (32, 2, 400, 4, 1)
    assert (cocoop["batch"], cocoop["steps"]) == (1, 640)
    assert (maple["batch"], maple["steps"], maple["n_ctx"], maple["depth"]) == (4, 80, 2, 2)  # 9 of 12 -> 2 of 2
    for s, paper in ((coop, RECIPES["CoOp"]), (maple, RECIPES["MaPLe"])):
        assert s["lr"] == pytest.approx(paper.lr * LR_SCALE) and s["warmup_lr"] == pytest.approx(1e-5 * LR_SCALE)
    assert coop["lr"] == pytest.approx(0.1)  # the shared recipe's CoOp lr defines the scale
    # Dassl: constant warm-up epoch, then cosine by epoch restarting its count after the warm-up
    assert epoch_lr(maple, 0) == maple["warmup_lr"] and epoch_lr(maple, 1) == pytest.approx(maple["lr"])
    assert epoch_lr(maple, 3) == pytest.approx(maple["lr"] * 0.5 * (1 + math.cos(math.pi * 2 / 5)))
    assert {ARM_RECIPE[a] for a in ("RLP r=1", "QCoOp 1b", "noise-CoOp 2b")} == {"CoOp"}


def test_lftl_ablation_arms_switch_one_component_each():
    full = components("contrastive", 512)
    assert (full["alpha"], full["lambda"], full["kappa"], full["beta_vpa"]) == (0.03, 0.1, 100, 1.0)
    assert components("contrastive, kappa 0.9% of pool", 512)["kappa"] == 5  # 500 / 55,388 of 512
    assert components("contrastive, kappa 3.5% of pool", 512)["kappa"] == 18  # 100 / 2,817 of 512
    assert components("contrastive, no class balance", 512)["lambda"] == 0.0
    assert components("contrastive, no contrast", 512)["alpha"] == 0.0
    assert components("margin, no VPA", 512) == {"sampler": "margin", "alpha": None, "lambda": None, "kappa": None,
                                                 "beta_vpa": 0.0, "overrides": {"beta_vpa": 0.0,
                                                                                "class_balance_topk": 100}}


def test_why_quotes_power_and_the_own_recipe_for_undecided_rows_only():
    diffs = {s: float(-3 + (s % 2)) for s in range(6)}  # mean -2.5, sd 0.55: contradicted
    row = {**paired(diffs, {s: 0.0 for s in range(6)}), "experiment": "prompts", "arm": "a", "baseline": "b"}
    row["power"] = power(row, 2.72, "paper")
    row["own_recipe"] = paired({s: 1.0 + s for s in range(6)}, {s: 0.0 for s in range(6)})
    line = why(row)
    assert row["verdict"] == "contradicted" and row["power"]["seeds_needed"] == 3
    assert "own recipe: +3.50 [" in line and "supported (6 seeds)" in line
    assert "needs 3 paired seeds at sd 0.55, 6 run" in line and "opposite of the paper's sign" in line
    row.update(verdict="supported", own_recipe={**row["own_recipe"], "verdict": "supported"})
    assert why(row) is None
    few = {**paired({s: 0.5 * (-1) ** s for s in range(5)}, {s: 0.0 for s in range(5)}), "experiment": "x",
           "arm": "a", "baseline": "b"}
    few["power"] = power(few, 0.2, "paper")
    assert few["verdict"] == "inconclusive" and "(underpowered)" in why(few)


def test_cached_run_is_reused_only_with_the_same_settings(tmp_path):
    path = run_path(tmp_path, "prompts", "RLP r=1", 3)
    assert path == tmp_path / "prompts" / "RLP_r_1" / "seed3.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"settings": {"steps": 300}, "metrics": {"hm": 1.0}}))
    assert load_run(tmp_path, "prompts", "RLP r=1", 3, {"steps": 300})["metrics"] == {"hm": 1.0}
    assert load_run(tmp_path, "prompts", "RLP r=1", 3, {"steps": 150}) is None


def test_table_shows_ci_and_verdict_for_both_recipes():
    row = {"claim": "c", "arm": "a", "baseline": "b", "metric": "hm", "n": 5, "mean_difference": 1.234,
           "ci95": [0.5, 2.0], "verdict": "supported", "power": {"paper_effect": 2.0, "seeds_needed": 7},
           "own_recipe": {"n": 6, "mean_difference": -0.5, "ci95": [-1.0, 0.25], "verdict": "inconclusive"},
           "why": "because"}
    assert ("| c | a vs b | hm | 5 | +1.23 [+0.50, +2.00] | supported | 6 | -0.50 [-1.00, +0.25] | inconclusive | "
            "+2.00 | 7 | because |") in table({"claims": [row]})


@pytest.mark.slow
def test_quick_small_run_fills_every_arm_and_resumes(tmp_path, capsys):
    args = ["--quick", "--size", "small", "--runs-dir", str(tmp_path), "--no-plots"]
    result = main(args)
    assert len(result["claims"]) == len(CLAIMS)
    crashed = {p.relative_to(tmp_path).parent.as_posix(): json.loads(p.read_text())["error"]
               for p in tmp_path.glob("*/*/*.error.json")}
    # the one expected failure: 2 steps cannot pull C-SGD's clusters together, so its slimming refuses (by design)
    assert set(crashed) <= {"pruning/C_SGD"}, crashed
    assert all("clusters have not converged" in err for err in crashed.values()), crashed
    for name, experiment in EXPERIMENTS.items():
        for arm in experiment.arms:
            if run_path(tmp_path, name, arm, 0).parent.relative_to(tmp_path).as_posix() in crashed:
                continue
            run = json.loads(run_path(tmp_path, name, arm, 0).read_text())
            assert run["settings"] == experiment.settings["small"] and run["metrics"], (name, arm)
    assert all(row["verdict"] == "pending" for row in result["claims"])  # one seed decides nothing
    assert all(row["own_recipe"]["n"] == 1 for row in result["claims"] if row["experiment"] == "prompts")
    capsys.readouterr()
    main(args)  # cached: only the recorded failure is retried
    assert f"{len(crashed)} runs to do" in capsys.readouterr().out
    for name in ("claims.json", "claims.md", "lftl_ablation.json", "lftl_ablation.md"):
        assert (tmp_path / name).exists(), name


def test_plots_write_pngs_with_error_bars(tmp_path):
    from plots import claims_plots, errorbar_plot  # matplotlib is in the test extra: this test never skips

    with pytest.raises(ValueError, match="at least one series"):
        errorbar_plot(tmp_path / "x.png", {}, "x", "y")
    summary = {"seeds": [0, 1], "gflops": {"mean": 0.03, "sd": 0.0}, "accuracy": {"mean": 40.0, "sd": 1.5}}
    result = {"arm_summaries": {"pyra_vit": {"PYRA low": summary, "LoRA+ToMe low": summary}},
              "experiments": {}}
    (path,) = claims_plots(result, tmp_path)
    assert path.name == "claims_pyra.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 5_000  # an axes with two series, not an empty canvas


def test_ablation_rows_pair_each_arm_with_margin_and_contrastive_by_seed():
    def runs(round1, classes):
        return {s: {"accuracy_round1": round1 + s, "aubc": 70.0 + s, "classes_labelled_round1": classes}
                for s in range(5)}

    data = {"contrastive": runs(58.0, 4), "margin": runs(67.0, 7), "contrastive, no class balance": runs(67.0, 7)}
    rows = {r["arm"]: r for r in ablation_rows(data, ("contrastive", "margin", "contrastive, no class balance"),
                                               512, 5)}
    assert rows["contrastive"]["round1_vs_margin"]["mean_difference"] == pytest.approx(-9.0)
    assert rows["contrastive"]["round1_vs_margin"]["verdict"] == "contradicted"  # sd 0: the interval is a point
    assert rows["contrastive, no class balance"]["round1_vs_contrastive"]["mean_difference"] == pytest.approx(9.0)
    assert "round1_vs_margin" not in rows["margin"] and rows["margin"]["classes_after_round1"] == 7
    assert (rows["contrastive"]["round1"], rows["contrastive"]["kappa"]) == (60.0, 100)


def test_query_rows_pair_classes_covered_with_margin_per_pool():
    data = {"margin": {s: {"classes_in_query": 7, "source_correct_in_query": 2, "queried": 10} for s in range(5)},
            "contrastive": {s: {"classes_in_query": 4 + s % 2, "source_correct_in_query": 4, "queried": 10}
                            for s in range(5)}}
    rows = {r["arm"]: r for r in query_rows(data, 512, 5)}
    assert set(rows) == set(QUERY_ARMS) and rows["contrastive, kappa 0.9% of pool"]["pools"] == 0
    assert rows["contrastive"]["classes_in_query"] == pytest.approx(4.4)
    assert rows["contrastive"]["classes_vs_margin"]["mean_difference"] == pytest.approx(-2.6)
    assert rows["contrastive"]["classes_vs_margin"]["verdict"] == "contradicted"


def test_maple_rows_compare_each_recipe_with_cocoop_on_the_same_recipe():
    def runs(hm):
        return {s: {"base": hm, "novel": hm, "hm": hm + 0.1 * s} for s in range(5)}

    data = {"prompts": {"MaPLe": runs(64.0), "CoCoOp": runs(66.0)}, "prompts_own": {"MaPLe": runs(67.0),
                                                                                      "CoCoOp": runs(66.5)},
            "maple_recipe": {"MaPLe, own recipe, 150 epochs": runs(63.0)}}
    rows = maple_rows(data, 5)
    assert [r["seeds"] for r in rows] == [5, 5] + [5 if a.endswith("150 epochs") else 0 for a in MAPLE_VARIANTS]
    assert rows[0]["hm_vs_cocoop_shared"]["mean_difference"] == pytest.approx(-2.0)
    assert rows[1]["hm_vs_cocoop_own"]["mean_difference"] == pytest.approx(0.5)
    long = next(r for r in rows if r["arm"].endswith("150 epochs"))
    assert long["hm_vs_cocoop_own"]["mean_difference"] == pytest.approx(-3.5)
    table = maple_markdown(rows)
    assert "| MaPLe, own recipe, 150 epochs | 5 | 63.0 | 63.0 | 63.2 |" in table and "| – | – | – |" in table
    row = {"arm": "MaPLe", "baseline": "CoCoOp", "experiment": "prompts", "verdict": "contradicted",
           **paired({s: m["hm"] for s, m in runs(64.0).items()}, {s: m["hm"] for s, m in runs(66.0).items()}),
           "power": {"paper_effect": 2.72}}
    assert "own recipe, 150 epochs -3.50" in why(row, maple=rows)


def test_pyra_modulation_rows_pair_each_learning_rate_with_both_claim_arms():
    def runs(accuracy):
        return {s: {"accuracy": accuracy + 0.1 * s * (s % 2)} for s in range(5)}

    data = {"pyra_vit": {"PYRA high": runs(32.0), "LoRA+ToMe high": runs(33.0)},
            "pyra_modulation": {"PYRA high, modulation at lr/100": runs(32.75)}}
    rows = pyra_modulation_rows(data, 5)
    assert [r["seeds"] for r in rows] == [5] + [5 if a.endswith("lr/100") else 0 for a in PYRA_LR_FACTORS]
    assert rows[0]["vs_lora_tome"]["mean_difference"] == pytest.approx(-1.0)
    slow = next(r for r in rows if r["arm"].endswith("lr/100"))
    assert slow["vs_lora_tome"]["mean_difference"] == pytest.approx(-0.25)
    assert slow["vs_shared_lr"]["mean_difference"] == pytest.approx(0.75)
    table = pyra_modulation_markdown(rows)
    assert "| PYRA high, modulation at lr/10 | 0 | – | – | – |" in table
    row = {"arm": "PYRA high", "baseline": "LoRA+ToMe high", "experiment": "pyra_vit", "verdict": "contradicted",
           **paired({s: m["accuracy"] for s, m in runs(32.0).items()}, {s: m["accuracy"] for s, m in runs(33.0).items()}),
           "power": {"paper_effect": 1.63}}
    line = why(row, pyra=rows)
    assert "modulation at lr/100 -0.25" in line and "lr/10 " not in line  # only the learning rates that have runs
    assert "modulation diagnostic" not in why({**row, "arm": "PYRA low", "baseline": "LoRA+ToMe low"}, pyra=rows)


def test_lftl_why_line_quotes_the_ablation_and_negates_stored_differences():
    def runs(value):
        return {s: {"accuracy_round1": value + 0.1 * s * (s % 2), "aubc": value} for s in range(5)}

    fixed = ablation_rows({"contrastive": runs(58.0), "margin": runs(67.0),
                           "contrastive, no class balance": runs(67.0)}, ABLATION_ARMS, 512, 5)
    pools = ablation_rows({"contrastive": runs(64.0), "random": runs(62.0)}, POOL_ARMS, 512, 5)
    row = {**paired({s: 1.0 + s % 2 for s in range(5)}, {s: 0.0 for s in range(5)}), "experiment": "lftl",
           "arm": "contrastive", "baseline": "random", "verdict": "inconclusive", "power": {"paper_effect": None}}
    line = why(row, {"fixed_pool": fixed, "pool_per_seed": pools})
    assert "contrastive -9.00 [" in line and "class balance off +0.00 [+0.00, +0.00]" in line
    # only random - contrastive is stored for the pools: the line states contrastive - random
    assert "pools drawn per seed, mean over rounds: +2.00 [+2.00, +2.00] supported (5 pools)" in line
