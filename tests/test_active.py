"""LFTL building blocks: budget schedule, samplers (CAS by hand), VPA losses and the anchor memory."""

import math
import random

import pytest
import torch

from peft_effadapt.active import (
    AnchorMemory,
    ContrastiveActiveSampler,
    EntropySampler,
    LFTLConfig,
    MarginSampler,
    RandomSampler,
    anchor_entropy,
    budget_schedule,
    information_maximization,
    vpa_loss,
)
from peft_effadapt.active.state import read_tensors, write_tensors

torch.set_num_threads(1)


@pytest.mark.parametrize("n, rho, rounds, expected", [
    (498, 0.01, 10, [5] * 10),
    (2817, 0.01, 10, [28] * 9 + [30]),
    (55388, 0.001, 10, [55] * 9 + [59]),
    (15, 0.05, 10, [1] * 8 + [0, 0]),  # the release would give the last round -1
])
def test_budget_schedule_official_cases(n, rho, rounds, expected):
    assert budget_schedule(n, rounds, rho) == expected


def test_budget_schedule_properties():
    rng = random.Random(0)
    for _ in range(500):
        n, rho, rounds = rng.randint(1, 100_000), rng.choice([0.001, 0.005, 0.01, 0.03, 0.05, 0.1]), rng.randint(1, 12)
        total = round(n * rho * rounds)
        if total > n:
            with pytest.raises(ValueError, match="exceeds the pool"):
                budget_schedule(n, rounds, rho)
            continue
        sched = budget_schedule(n, rounds, rho)
        assert sum(sched) == total and min(sched) >= 0 and len(sched) == rounds
        assert all(s <= round(n * rho) for s in sched[:-1])
    assert budget_schedule(100, 3, total_budget=10) == [3, 3, 4]


def test_budget_larger_than_pool_raises():
    with pytest.raises(ValueError, match="exceeds the pool size"):
        budget_schedule(10, 3, total_budget=11)


P = torch.tensor([[0.5, 0.3, 0.2], [0.4, 0.4, 0.2], [0.1, 0.8, 0.1], [0.34, 0.33, 0.33]])
P_PREV = torch.tensor([[0.7, 0.1, 0.2], [0.4, 0.4, 0.2], [0.3, 0.6, 0.1], [0.2, 0.4, 0.4]])


def test_cas_first_query_is_margin_and_cache_keeps_unqueried():
    cas = ContrastiveActiveSampler(cd_ratio=0.5, class_balance_lambda=0.0)
    ids = torch.tensor([10, 11, 12, 13])
    sel = cas.select(ids, P, 2)
    ref = MarginSampler().select(ids, P, 2)
    assert sel.pool_ids == ref.pool_ids == [11, 13]  # margins 0.2, 0.0, 0.7, 0.01 -> lowest: 11 (0.0), 13 (0.01)
    assert cas.prev_ids.tolist() == [10, 12] and torch.equal(cas.prev_probs, P[[0, 2]])


def test_cas_contrast_by_hand_aligned_by_pool_id():
    cas = ContrastiveActiveSampler(cd_ratio=0.5, class_balance_lambda=0.0)
    cas.load_state_dict({"prev_ids": torch.tensor([13, 12, 11, 10]), "prev_probs": P_PREV.flip(0)})
    ids = torch.tensor([10, 11, 12, 13])
    q = P + 0.5 * (P - P_PREV)
    top = q.topk(2, dim=1).values
    u = top[:, 0] - top[:, 1]
    sel = cas.select(ids, P, 4)
    assert sel.pool_ids == ids[torch.sort(u, stable=True).indices].tolist()
    assert torch.allclose(torch.tensor(sel.scores), torch.sort(u, stable=True).values)
    # the contrast moves sample 10 (now ~tied at 0) before 13 (pushed up to 0.115); plain margin: 11, 13, 10, 12
    assert sel.pool_ids != MarginSampler().select(ids, P, 4).pool_ids


def test_cas_alpha_zero_equals_margin_sampler():
    probs = torch.softmax(torch.randn(50, 5, generator=torch.Generator().manual_seed(1)), 1)
    ids = torch.arange(100, 150)
    cas = ContrastiveActiveSampler(cd_ratio=0.0, class_balance_lambda=0.0)
    cas.load_state_dict({"prev_ids": ids, "prev_probs": probs.flip(0)})
    assert cas.select(ids, probs, 7).pool_ids == MarginSampler().select(ids, probs, 7).pool_ids


def test_cas_class_balance_by_hand():
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.1, 0.45, 0.45], [0.3, 0.5, 0.2], [0.2, 0.2, 0.6]])
    cas = ContrastiveActiveSampler(class_balance_lambda=0.1, class_balance_topk=2)
    sel = cas.select(torch.arange(5), probs, 5)
    assert sel.extras["class_weights"] == [1.0, 0.0, 0.0]  # both most-confident samples predict class 0
    u = torch.tensor([0.85, 0.7, 0.0, 0.2, 0.4])
    u = u / u.max() + 0.1 * torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0])
    assert sel.pool_ids == torch.sort(u, stable=True).indices.tolist()
    assert torch.allclose(torch.tensor(sel.scores), torch.sort(u, stable=True).values)


def test_cas_permutation_invariance():
    gen = torch.Generator().manual_seed(2)
    probs, prev = (torch.softmax(torch.randn(40, 4, generator=gen) * 3, 1) for _ in range(2))
    ids = torch.arange(40)
    perm = torch.randperm(40, generator=gen)
    a, b = ContrastiveActiveSampler(class_balance_topk=10), ContrastiveActiveSampler(class_balance_topk=10)
    a.load_state_dict({"prev_ids": ids, "prev_probs": prev})
    b.load_state_dict({"prev_ids": ids[perm], "prev_probs": prev[perm]})
    assert sorted(a.select(ids, probs, 6).pool_ids) == sorted(b.select(ids[perm], probs[perm], 6).pool_ids)


@pytest.mark.parametrize("sampler", [ContrastiveActiveSampler(), RandomSampler(), EntropySampler(), MarginSampler()])
def test_samplers_exact_unique_and_bad_sizes(sampler):
    probs = torch.softmax(torch.randn(30, 3, generator=torch.Generator().manual_seed(0)), 1)
    ids = torch.arange(5, 35)
    sel = sampler.select(ids, probs, 9, round_idx=1, seed=3)
    assert len(sel.pool_ids) == len(set(sel.pool_ids)) == 9 and set(sel.pool_ids) <= set(ids.tolist())
    with pytest.raises(ValueError, match="only 30 unlabelled"):
        sampler.select(ids, probs, 31)
    with pytest.raises(ValueError, match="probs must be"):
        sampler.select(ids[:-1], probs, 3)


def test_random_sampler_depends_on_seed_and_round_only():
    probs = torch.full((100, 2), 0.5)
    ids = torch.arange(100)
    s = RandomSampler()
    assert s.select(ids, probs, 10, round_idx=2, seed=1).pool_ids == s.select(ids, probs, 10, round_idx=2,
                                                                              seed=1).pool_ids
    assert s.select(ids, probs, 10, round_idx=3, seed=1).pool_ids != s.select(ids, probs, 10, round_idx=2,
                                                                              seed=1).pool_ids


def test_entropy_sampler_picks_most_uncertain():
    probs = torch.tensor([[0.98, 0.01, 0.01], [1 / 3, 1 / 3, 1 / 3], [0.6, 0.3, 0.1]])
    assert EntropySampler().select(torch.arange(3), probs, 2).pool_ids == [1, 2]


def test_information_maximization_extremes():
    assert information_maximization(torch.full((6, 4), 0.25)).abs() < 1e-6
    onehot = torch.eye(4).repeat(2, 1)
    assert information_maximization(onehot).item() == pytest.approx(-math.log(4), abs=1e-4)


def test_anchor_entropy_cases():
    f = torch.randn(5, 8)
    assert anchor_entropy(f, torch.randn(1, 8)).abs() < 1e-4  # one anchor: softmax over one entry (eps shift)
    anchors = torch.eye(8)[:4] * 3.0
    feats = anchors[:2].clone().requires_grad_(True)
    loss = anchor_entropy(feats, anchors)
    assert loss < math.log(4)
    cos = torch.eye(4)[:2]
    p = torch.softmax(cos, 1)
    assert loss.item() == pytest.approx(float(-(p * torch.log(p + 1e-5)).sum(1).mean()), abs=1e-6)
    memory = AnchorMemory(10)
    memory.update([1, 2, 3, 4], anchors)
    before = memory.bank.clone()
    anchor_entropy(feats, memory.rows([1, 2, 3, 4])).backward()
    assert not memory.bank.requires_grad and torch.equal(memory.bank, before) and feats.grad is not None
    assert torch.isfinite(anchor_entropy(feats, torch.zeros(3, 8)))  # zero rows do not give NaN


def test_vpa_loss_combines_terms():
    gen = torch.Generator().manual_seed(0)
    lab, unl, feats, anchors = (torch.randn(s, generator=gen) for s in ((4, 3), (6, 3), (6, 5), (4, 5)))
    y = torch.tensor([0, 1, 2, 0])
    total, parts = vpa_loss(lab, y, unl, feats, anchors, beta_im=0.9, beta_vpa=10.0)
    expected = parts["ce"] + 0.9 * parts["im"] + 10.0 * parts["vpa"]
    assert total.item() == pytest.approx(expected, rel=1e-5)


def test_memory_ema_rows_by_pool_id():
    memory = AnchorMemory(6, momentum=0.9)
    memory.update([4, 1], torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert torch.allclose(memory.bank[4], torch.tensor([0.9, 1.8])) and torch.allclose(memory.bank[1], torch.tensor(
        [2.7, 3.6]))
    memory.update([4], torch.tensor([[0.0, 0.0]]))
    assert torch.allclose(memory.bank[4], torch.tensor([0.09, 0.18]))
    assert memory.bank[[0, 2, 3, 5]].abs().sum() == 0
    with pytest.raises(ValueError, match="memory ids"):
        memory.update([6], torch.zeros(1, 2))


def test_states_round_trip_through_safetensors(tmp_path):
    cas, memory = ContrastiveActiveSampler(), AnchorMemory(4)
    for obj, name in ((cas, "s"), (memory, "m")):  # empty states too
        write_tensors(tmp_path / f"{name}.safetensors", obj.state_dict())
        obj.load_state_dict(read_tensors(tmp_path / f"{name}.safetensors"))
    cas.select(torch.arange(5), torch.softmax(torch.randn(5, 3), 1), 2)
    memory.update([0, 3], torch.randn(2, 7))
    write_tensors(tmp_path / "s.safetensors", cas.state_dict())
    write_tensors(tmp_path / "m.safetensors", memory.state_dict())
    cas2, memory2 = ContrastiveActiveSampler(), AnchorMemory(4)
    cas2.load_state_dict(read_tensors(tmp_path / "s.safetensors"))
    memory2.load_state_dict(read_tensors(tmp_path / "m.safetensors"))
    assert torch.equal(cas2.prev_probs, cas.prev_probs) and torch.equal(memory2.bank, memory.bank)


def test_config_validation():
    with pytest.raises(ValueError, match="memory_update"):
        LFTLConfig(memory_update="step")
    with pytest.raises(ValueError, match="unlabelled_per_epoch"):
        LFTLConfig(unlabelled_per_epoch=0)
    assert LFTLConfig.visda_c().class_balance_topk == 500


def test_cas_logprob_contrast_space():
    cas = ContrastiveActiveSampler(cd_ratio=0.5, class_balance_lambda=0.0, contrast_space="logprob")
    cas.load_state_dict({"prev_ids": torch.arange(4), "prev_probs": P_PREV})
    logp, logq = torch.log(P + 1e-5), torch.log(P_PREV + 1e-5)
    q = torch.softmax(logp + 0.5 * (logp - logq), 1)
    assert torch.allclose(cas.contrast(torch.arange(4), P), q)
    top = q.topk(2, dim=1).values
    assert cas.select(torch.arange(4), P, 2).pool_ids == torch.sort(top[:, 0] - top[:, 1], stable=True).indices[
        :2].tolist()
