"""The package's `evaluate` metric modules: loadable offline by path, and the same numbers as the formulas they
replaced (accuracy = mean of exact matches; HM = 2BN/(B+N); retrieval ranks with ties in the query's favour)."""

from pathlib import Path

import evaluate
import numpy as np
import pytest

from peft_effadapt.metrics import METRICS, load_metric, metric_path
from peft_effadapt.tasks import accuracy, harmonic_mean, retrieval_metrics


def test_metric_path_points_at_the_shipped_script_and_rejects_unknown_names():
    for name in METRICS:
        assert Path(metric_path(name)).is_file()
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        metric_path("bleu")


def test_evaluate_load_by_path_works_offline():
    metric = evaluate.load(metric_path("top1_accuracy"), keep_in_memory=True)
    assert metric.compute(predictions=[0, 1, 2, 2], references=[0, 1, 1, 2]) == {"accuracy": 75.0}
    assert load_metric("top1_accuracy").compute(predictions=[], references=[]) == {"accuracy": 0.0}


def test_base_to_novel_matches_the_former_formulas():
    # base: 3 of 4 right (75 %); novel: 1 of 2 right (50 %); HM = 2 * 75 * 50 / 125 = 60
    out = load_metric("base_to_novel").compute(predictions=[0, 1, 1, 0, 2, 0], references=[0, 1, 0, 0, 2, 1],
                                               novel=[False, False, False, False, True, True])
    assert out == {"base": 75.0, "novel": 50.0, "hm": 60.0}
    rng = np.random.default_rng(0)
    pred, ref, novel = rng.integers(0, 5, 300), rng.integers(0, 5, 300), rng.random(300) < 0.4
    out = load_metric("base_to_novel").compute(predictions=pred, references=ref, novel=novel)
    base, new = (float((pred[m] == ref[m]).mean() * 100) for m in (~novel, novel))
    assert out["base"] == base and out["novel"] == new
    assert out["hm"] == pytest.approx(harmonic_mean(base, new), rel=1e-12)
    assert accuracy(pred, ref) == float((pred == ref).mean() * 100)


def _former_retrieval(sim: np.ndarray) -> dict[str, float]:
    out = {}
    for prefix, matrix in (("t2v", sim), ("v2t", sim.T)):
        ranks = (matrix > np.diag(matrix)[:, None]).sum(1) + 1
        recalls = {k: float((ranks <= k).mean() * 100) for k in (1, 5, 10)}
        out.update({f"{prefix}_R@{k}": v for k, v in recalls.items()})
        out.update({f"{prefix}_MdR": float(np.median(ranks)), f"{prefix}_MnR": float(ranks.mean()),
                    f"{prefix}_R-Sum": sum(recalls.values())})
    return out


def test_text_video_retrieval_matches_the_former_computation():
    rng = np.random.default_rng(1)
    sim = rng.normal(size=(60, 60)).astype(np.float32)
    sim[:, 3] = sim[3, 3]  # ties in a column: they count in the query's favour
    metric = load_metric("text_video_retrieval").compute(predictions=sim, references=np.arange(60))
    assert metric == _former_retrieval(sim)
    assert retrieval_metrics(sim) == metric


def test_text_video_retrieval_rejects_unpaired_references():
    with pytest.raises(ValueError, match="0..n-1"):
        load_metric("text_video_retrieval").compute(predictions=np.eye(3), references=[0, 2, 1])
