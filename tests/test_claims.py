"""benchmarks/claims.py: the paired statistics behind each verdict, the run cache, and (slow) a cut-down --quick run."""

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from claim_stats import paired, t975  # noqa: E402
from claims import CLAIMS, EXPERIMENTS, load_run, main, run_path, table  # noqa: E402


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
        arms = EXPERIMENTS[claim.experiment].arms
        assert claim.arm in arms and claim.baseline in arms, claim.name


def test_cached_run_is_reused_only_with_the_same_settings(tmp_path):
    path = run_path(tmp_path, "prompts", "RLP r=1", 3)
    assert path == tmp_path / "prompts" / "RLP_r_1" / "seed3.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"settings": {"steps": 300}, "metrics": {"hm": 1.0}}))
    assert load_run(tmp_path, "prompts", "RLP r=1", 3, {"steps": 300})["metrics"] == {"hm": 1.0}
    assert load_run(tmp_path, "prompts", "RLP r=1", 3, {"steps": 150}) is None


def test_table_shows_ci_and_verdict():
    row = {"claim": "c", "arm": "a", "baseline": "b", "metric": "hm", "n": 5, "mean_difference": 1.234,
           "ci95": [0.5, 2.0], "verdict": "supported"}
    assert "| c | a vs b | hm | 5 | +1.23 [+0.50, +2.00] | supported |" in table({"claims": [row]})


@pytest.mark.slow
def test_quick_small_run_fills_every_arm_and_resumes(tmp_path, capsys):
    args = ["--quick", "--size", "small", "--runs-dir", str(tmp_path), "--no-plots"]
    result = main(args)
    assert len(result["claims"]) == len(CLAIMS)
    for name, experiment in EXPERIMENTS.items():
        for arm in experiment.arms:
            done = run_path(tmp_path, name, arm, 0)
            failed = done.with_suffix(".error.json")
            assert done.exists() or failed.exists(), (name, arm)  # a failure is recorded, never lost
    assert all(row["verdict"] == "pending" for row in result["claims"])  # one seed decides nothing
    capsys.readouterr()
    main(args)  # cached: only the recorded failures are retried
    failures = len(list(tmp_path.glob("*/*/*.error.json")))
    assert f"{failures} runs to do" in capsys.readouterr().out
    assert (tmp_path / "claims.json").exists() and (tmp_path / "claims.md").exists()


def test_plots_write_pngs_with_error_bars(tmp_path):
    pytest.importorskip("matplotlib")
    from plots import claims_plots, errorbar_plot

    with pytest.raises(ValueError, match="at least one series"):
        errorbar_plot(tmp_path / "x.png", {}, "x", "y")
    summary = {"seeds": [0, 1], "gflops": {"mean": 0.03, "sd": 0.0}, "accuracy": {"mean": 40.0, "sd": 1.5}}
    result = {"arm_summaries": {"pyra_vit": {"PYRA low": summary, "LoRA+ToMe low": summary}},
              "experiments": {}}
    (path,) = claims_plots(result, tmp_path)
    assert path.name == "claims_pyra.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
