"""ActiveAdaptationLoop on a tiny MLP: exact budgets, no repeats, determinism, resume, label hiding, PEFT, errors."""

import gc
import hashlib
import json

import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Sequence, Value
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from peft_effadapt import ActiveAdaptationLoop, LFTLConfig
from peft_effadapt.active import loop as loop_module
from peft_effadapt.active.state import adapted_state

torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="module")
def _fast_gc():
    """Trainer.train() ends with gc.collect(); freezing the objects already alive keeps that cheap in pytest."""
    gc.freeze()
    yield
    gc.unfreeze()
C = 3


class TinyClassifier(nn.Module):
    def __init__(self, dim=8, classes=C, norm=True):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(dim, 16), nn.BatchNorm1d(16) if norm else nn.Identity(), nn.ReLU())
        self.classifier = nn.Linear(16, classes)

    def forward(self, x):
        return SequenceClassifierOutput(logits=self.classifier(self.body(x)))


def make_pool(n=90, seed=0, labels=None):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, (n,), generator=gen)
    x = torch.randn(n, 8, generator=gen) + 2 * nn.functional.one_hot(y, 8).float()
    feats = Features({"x": Sequence(Value("float32")), "label": ClassLabel(num_classes=C)})
    return Dataset.from_dict({"x": x.numpy(), "label": (y.tolist() if labels is None else labels)}, features=feats)


def make_model(norm=True):
    torch.manual_seed(0)
    return TinyClassifier(norm=norm)


CFG = dict(num_rounds=3, ratio_per_round=0.05, epochs_per_round=1, batch_size=16, class_balance_topk=20, lr=0.05)


def run_loop(out, pool=None, model=None, **kwargs):
    cfg = LFTLConfig(**{**CFG, **kwargs.pop("cfg", {})})
    loop = ActiveAdaptationLoop(model or make_model(), pool or make_pool(), out, config=cfg, show_progress=False,
                                **kwargs)
    return loop, loop.run()


def queried(out, rounds=3):
    return [json.loads((out / f"round_{r:03d}" / "labels.json").read_text())["pool_ids"] for r in range(1, rounds + 1)]


def file_digests(out):
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*") if p.is_file()}


@pytest.mark.parametrize("sampler", ["contrastive", "entropy", "margin", "random"])
def test_budget_exact_no_repeats(tmp_path, sampler):
    loop, history = run_loop(tmp_path, sampler=sampler)
    ids = queried(tmp_path)
    assert [len(q) for q in ids] == loop.schedule == [4, 4, 6]  # round(90 * 0.05) = 4, top-up to round(13.5) = 14
    flat = [i for q in ids for i in q]
    assert len(flat) == len(set(flat)) == 14 and set(flat) == set(loop.labels)
    assert [h["num_labelled"] for h in history] == [0, 4, 8, 14]
    assert all(0 <= h["accuracy"] <= 1 and 0 <= h["mean_class_accuracy"] <= 1 for h in history)
    bank, unlabelled = loop.memory.bank, [i for i in range(90) if i not in loop.labels]
    assert bank[sorted(flat)].abs().sum(1).gt(0).all() and bank[unlabelled].abs().sum() == 0  # pool-id rows (B1)


def test_deterministic_under_seed(tmp_path):
    a, _ = run_loop(tmp_path / "a")
    b, _ = run_loop(tmp_path / "b")
    assert queried(tmp_path / "a") == queried(tmp_path / "b")
    sa, sb = adapted_state(a.model), adapted_state(b.model)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c, _ = run_loop(tmp_path / "c", sampler="random", cfg={"seed": 1})
    assert queried(tmp_path / "c") != queried(tmp_path / "a")


def test_resume_equals_uninterrupted_and_failed_round_keeps_state(tmp_path, monkeypatch):
    full, full_history = run_loop(tmp_path / "full")
    pool = make_pool()
    calls = []

    def oracle(ids):
        calls.append(list(ids))
        return [pool["label"][i] for i in ids]

    train = loop_module.ActiveAdaptationLoop._train

    def failing_train(self, r):
        if r == 2:
            train(self, r)  # the failure comes after the round's weights and memory have moved in memory
            raise RuntimeError("interrupted in round 2")
        return train(self, r)

    monkeypatch.setattr(loop_module.ActiveAdaptationLoop, "_train", failing_train)
    out = tmp_path / "resumed"
    loop = ActiveAdaptationLoop(make_model(), pool, out, config=LFTLConfig(**CFG), oracle=oracle, show_progress=False)
    saved_round1 = {}
    with pytest.raises(RuntimeError, match="interrupted"):
        try:
            loop.run()
        finally:
            saved_round1 = file_digests(out)
    state = json.loads((out / "loop_state.json").read_text())
    assert state["completed_round"] == 1 and len(calls) == 2  # round 2 was queried and labelled, not trained
    assert (out / "round_002" / "labels.json").is_file() and not (out / "round_002" / "metrics.json").exists()
    round1 = {k: v for k, v in saved_round1.items() if k.startswith(("round_000", "round_001", "loop_state"))}
    assert all(file_digests(out)[k] == v for k, v in round1.items())
    # the in-memory model went back to round 1's weights
    r1 = loop_module.read_tensors(out / "round_001" / "adapted.safetensors")
    assert all(torch.equal(adapted_state(loop.model)[k], v) for k, v in r1.items())

    monkeypatch.setattr(loop_module.ActiveAdaptationLoop, "_train", train)
    resumed = ActiveAdaptationLoop(make_model(), pool, out, config=LFTLConfig(**CFG), oracle=oracle,
                                   show_progress=False)
    history = resumed.run()
    assert len(calls) == 3 and calls[2] == queried(out)[2]  # only round 3 was asked; round 2's labels were kept
    assert queried(out) == queried(tmp_path / "full") and resumed.labels == full.labels
    sf, sr = adapted_state(full.model), adapted_state(resumed.model)
    assert all(torch.equal(sf[k], sr[k]) for k in sf)
    assert [h["accuracy"] for h in history] == [h["accuracy"] for h in full_history]
    assert ActiveAdaptationLoop(make_model(), pool, out, config=LFTLConfig(**CFG), oracle=oracle,
                                show_progress=False).run() == history and len(calls) == 3  # finished: no work


def test_unqueried_pool_labels_never_reach_training(tmp_path):
    truth = make_pool()
    garbage = make_pool(labels=[(y + 1) % C for y in truth["label"]])
    eval_set = make_pool(n=30, seed=5)
    runs = []
    for name, pool in (("true", truth), ("garbage", garbage)):
        loop, _ = run_loop(tmp_path / name, pool=pool, oracle=lambda ids: [truth["label"][i] for i in ids],
                           eval_dataset=eval_set)
        runs.append(adapted_state(loop.model))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_lora_adapter_only_moves_and_reloads(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    base = make_model(norm=False)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["body.0"], modules_to_save=["classifier"]))
    loop, history = run_loop(tmp_path, model=model, cfg={"backbone_lr_mult": 1.0})
    base_now = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
                for k, v in model.state_dict().items() if "lora_" not in k and "modules_to_save" not in k}
    assert all(torch.equal(base_now[k], before[k]) for k in ("body.0.weight", "body.0.bias"))
    assert any(not torch.equal(model.state_dict()[k], before["body.0.weight"]) for k in model.state_dict()
               if "lora_B" in k)
    reloaded = PeftModel.from_pretrained(make_model(norm=False), str(tmp_path / "round_003" / "adapter"))
    reloaded.eval()
    pool = make_pool()
    with torch.no_grad():
        pred = reloaded(torch.tensor(pool["x"])).logits.argmax(1)
    assert float((pred == torch.tensor(pool["label"])).float().mean()) == pytest.approx(history[-1]["accuracy"])


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="exceeds the pool size"):
        run_loop(tmp_path / "a", cfg={"total_budget": 91})
    with pytest.raises(ValueError, match="no label column 'label'"):
        run_loop(tmp_path / "b", pool=make_pool().remove_columns("label"), num_classes=C)
    with pytest.raises(ValueError, match="gives 5 logits per sample but the task has 3 classes"):
        run_loop(tmp_path / "c", model=TinyClassifier(classes=5))
    with pytest.raises(ValueError, match="has no module named 'head'"):
        run_loop(tmp_path / "d", cfg={"feature_module": "head"})
    with pytest.raises(ValueError, match="returned 1 labels for 4"):
        run_loop(tmp_path / "e", oracle=lambda ids: [0])
    assert not (tmp_path / "e" / "round_001" / "labels.json").exists()
    with pytest.raises(ValueError, match="not a class index"):
        run_loop(tmp_path / "f", oracle=lambda ids: [7] * len(ids))
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()  # checks run before anything is written


def test_consolidator_adapter_on_vit(tmp_path):
    from peft import get_peft_model

    from peft_effadapt import ConsolidatorConfig
    from peft_effadapt.testing import tiny_pixel_values, tiny_vit

    base = tiny_vit(seed=0, num_labels=C)
    frozen = {k: v.clone() for k, v in base.state_dict().items() if "classifier" not in k}
    model = get_peft_model(base, ConsolidatorConfig(fc_groups=[16], modules_to_save=["classifier"]))
    y = torch.arange(24) % C
    pool = Dataset.from_dict({"pixel_values": tiny_pixel_values(24, seed=3).numpy(), "label": y.tolist()})
    loop, history = run_loop(tmp_path, pool=pool, model=model, num_classes=C,
                             cfg={"num_rounds": 2, "ratio_per_round": 0.25, "epochs_per_round": 1, "batch_size": 8,
                                  "lambda_mixup": 0.0})
    assert [h["num_labelled"] for h in history] == [0, 6, 12]
    assert (tmp_path / "round_002" / "adapter" / "adapter_config.json").is_file()
    now = {k.replace(".base_layer", ""): v for k, v in model.get_base_model().state_dict().items()}
    assert sum(k in now for k in frozen) > 5 and all(torch.equal(now[k], v) for k, v in frozen.items() if k in now)
    # (layer norms are trained by Consolidator by default and live in modules_to_save, so they are not compared)
