"""LFTL on the bundled testbed shift: the tiny source ResNet (~48 % on the target domain) adapting to the target."""

import gc
import statistics

import pytest
import torch

from peft_effadapt import ActiveAdaptationLoop, ImagePreprocess, LFTLConfig
from peft_effadapt.testing import load_source_classifier, make_domain_dataset

torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="module")
def _fast_gc():
    """Trainer.train() ends with gc.collect(); freezing the objects already alive keeps that cheap in pytest."""
    gc.freeze()
    yield
    gc.unfreeze()


def run(tmp_path, sampler, seed, pool_per_class, **cfg):
    model, processor = load_source_classifier()
    pool = make_domain_dataset("target", "train", n_per_class=pool_per_class)
    test = make_domain_dataset("target", "test", n_per_class=32)
    loop = ActiveAdaptationLoop(model, pool, tmp_path / f"{sampler}-{seed}", config=LFTLConfig(seed=seed, **cfg),
                                sampler=sampler, preprocess=ImagePreprocess(processor),
                                train_preprocess=ImagePreprocess(processor, hflip=True), eval_dataset=test,
                                show_progress=False)
    return [h["accuracy"] for h in loop.run()]


def test_accuracy_rises_with_rounds_small(tmp_path):
    acc = run(tmp_path, "contrastive", 0, 16, num_rounds=3, ratio_per_round=0.03, epochs_per_round=2, lr=0.01)
    assert acc[0] == pytest.approx(0.48, abs=0.03)  # the source model on the target test split
    assert acc[-1] >= acc[0] + 0.05 and acc[-1] >= acc[1]


@pytest.mark.slow
def test_contrastive_beats_random_over_three_seeds(tmp_path):
    cfg = dict(num_rounds=5, ratio_per_round=0.02, epochs_per_round=3, lr=0.01)  # = benchmarks/lftl.py defaults
    curves = {s: [run(tmp_path, s, seed, 64, **cfg) for seed in (0, 1, 2)] for s in ("contrastive", "random")}
    for curve in curves["contrastive"]:
        assert curve[-1] >= curve[1] + 0.05 and curve[-1] >= curve[0] + 0.15
    final = {s: statistics.mean(c[-1] for c in cs) for s, cs in curves.items()}
    area = {s: statistics.mean(statistics.mean(c[1:]) for c in cs) for s, cs in curves.items()}
    assert final["contrastive"] > final["random"] and area["contrastive"] > area["random"]
