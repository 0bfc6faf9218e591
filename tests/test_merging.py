"""The token-merging core (peft_effadapt.merging): matching, weighted merge, sources, bias, schedules (tome.md §b, §e)."""

from __future__ import annotations

import pytest
import torch

from peft_effadapt.merging import (
    PYRA_PRESETS,
    bipartite_soft_matching,
    check_schedule,
    clamp_schedule,
    decreasing_schedule,
    log_size_bias,
    max_mergeable,
    merge_source,
    merge_tokens,
    merge_wavg,
    ramp_schedule,
    resolve_schedule,
    token_counts,
    tokens_by_group,
    validate_spec,
)


# -- a reference written independently, one sample at a time with Python loops ------------------------------------
def reference_merge(metric, x, size, r, protected):
    """Per-sample ToMe step as described in the spec (b.3/b.4): returns (x, size, groups) with groups[j] = indices of
    the input tokens averaged into output token j."""
    n = metric.shape[0]
    r = min(r, (n - protected) // 2)
    a_pos, b_pos = list(range(0, n, 2)), list(range(1, n, 2))
    unit = metric / metric.norm(dim=-1, keepdim=True)
    best = []
    for i, pa in enumerate(a_pos):
        scores = torch.stack([unit[pa] @ unit[pb] for pb in b_pos])
        if protected >= 2:
            scores[0] = -torch.inf
        score, j = scores.max(0)
        if protected >= 1 and pa == 0:
            score = torch.tensor(-torch.inf)
        best.append((score.item(), i, int(j)))
    order = sorted(range(len(a_pos)), key=lambda i: -best[i][0])  # stable like a descending sort on distinct values
    merged_a = set(order[:r])
    groups_b = {j: [b_pos[j]] for j in range(len(b_pos))}
    for i in order[:r]:
        groups_b[best[i][2]].append(a_pos[i])
    kept_a = [[a_pos[i]] for i in range(len(a_pos)) if i not in merged_a]
    groups = kept_a + [groups_b[j] for j in range(len(b_pos))]
    if protected == 2:
        groups = [groups[0], groups[len(kept_a)]] + groups[1 : len(kept_a)] + groups[len(kept_a) + 1 :]
    new_x = torch.stack([(x[g] * size[g]).sum(0) / size[g].sum(0) for g in groups])
    new_size = torch.stack([size[g].sum(0) for g in groups])
    return new_x, new_size, groups


@pytest.mark.parametrize("protected", [0, 1, 2])
@pytest.mark.parametrize("n,r", [(17, 4), (65, 8), (64, 20), (9, 4)])
def test_matches_reference_over_two_steps(protected, n, r):
    torch.manual_seed(n + r + protected)
    batch, channels = 3, 8
    x = torch.randn(batch, n, channels, dtype=torch.float64)
    size = None
    ref_x = [x[b] for b in range(batch)]
    ref_size = [torch.ones(n, 1, dtype=torch.float64) for _ in range(batch)]
    for _step in range(2):
        metric = torch.randn(batch, x.shape[1], 5, dtype=torch.float64)
        plan = bipartite_soft_matching(metric, r, protected)
        x, size = merge_wavg(plan, x, size)
        for b in range(batch):
            ref_x[b], ref_size[b], _ = reference_merge(metric[b], ref_x[b], ref_size[b], r, protected)
        for b in range(batch):
            torch.testing.assert_close(x[b], ref_x[b], rtol=0, atol=1e-12)
            torch.testing.assert_close(size[b], ref_size[b], rtol=0, atol=0)


def test_clamps_r_to_half_and_protects_cls():
    torch.manual_seed(0)
    x = torch.randn(2, 65, 16)
    plan = bipartite_soft_matching(x, 40, protected=1)
    assert plan.r == 32 == max_mergeable(65, 1)
    merged, size = merge_wavg(plan, x)
    assert merged.shape == (2, 33, 16)
    torch.testing.assert_close(merged[:, 0], x[:, 0], rtol=0, atol=0)  # CLS untouched and first
    assert torch.all(size[:, 0] == 1) and torch.all(size >= 1) and torch.all(size.sum(1) == 65)


def test_distillation_token_is_never_merged_and_stays_second():
    torch.manual_seed(1)
    x = torch.randn(2, 66, 8)
    x[:, 3] = x[:, 1]  # a perfect partner for the distillation token: still must not merge into it
    plan = bipartite_soft_matching(x, 20, protected=2)
    merged, size = merge_wavg(plan, x)
    torch.testing.assert_close(merged[:, :2], x[:, :2], rtol=0, atol=0)
    assert torch.all(size[:, :2] == 1)


def test_sources_are_ordered_by_score_and_modulation_sees_them():
    torch.manual_seed(2)
    metric = torch.randn(1, 17, 4)
    plan = bipartite_soft_matching(metric, 5, protected=1)
    unit = metric / metric.norm(dim=-1, keepdim=True)
    scores = (unit[:, ::2] @ unit[:, 1::2].transpose(1, 2)).max(-1).values[0]
    chosen = scores[plan.src_idx[0, :, 0]]
    assert torch.all(chosen[:-1] >= chosen[1:])
    seen = {}

    def modulate(src, dst):
        seen["src"], seen["dst"] = src.clone(), dst.clone()
        return torch.zeros_like(src)

    x = torch.randn(1, 17, 3)
    merged = merge_tokens(plan, x, mode="sum", modulate=modulate)
    torch.testing.assert_close(seen["src"][0], x[0, ::2][plan.src_idx[0, :, 0]])
    torch.testing.assert_close(seen["dst"][0], x[0, 1::2][plan.dst_idx[0, :, 0]])
    torch.testing.assert_close(merged[:, -8:], x[:, 1::2])  # zeroed sources add nothing to the destinations


def test_r_zero_is_identity():
    x = torch.randn(2, 17, 4)
    plan = bipartite_soft_matching(x, 0)
    merged, size = merge_wavg(plan, x)
    assert merged is x and torch.all(size == 1)


def test_source_trace_agrees_with_sizes_and_groups():
    torch.manual_seed(3)
    x = torch.randn(2, 33, 6, dtype=torch.float64)
    size = source = None
    reference_groups = [[[i] for i in range(33)] for _ in range(2)]
    for r in (8, 6):
        metric = torch.randn(2, x.shape[1], 4, dtype=torch.float64)
        plan = bipartite_soft_matching(metric, r, 1)
        source = merge_source(plan, source, batch=2)
        x, size = merge_wavg(plan, x, size)
        for b in range(2):
            _, _, groups = reference_merge(metric[b], x.new_zeros(metric.shape[1], 1), x.new_ones(metric.shape[1], 1),
                                           r, 1)
            reference_groups[b] = [sorted(i for g in group for i in reference_groups[b][g]) for group in groups]
    torch.testing.assert_close(source.sum(-1, keepdim=True), size.float())
    assert tokens_by_group(source) == reference_groups


def test_log_size_bias_shape_and_values():
    size = torch.tensor([[[1.0], [2.0], [4.0]]])
    bias = log_size_bias(size)
    assert bias.shape == (1, 1, 1, 3)
    torch.testing.assert_close(bias.flatten(), torch.tensor([0.0, 2.0, 4.0]).log().nan_to_num(neginf=0.0) * 1)
    assert log_size_bias(None) is None


# -- schedules ------------------------------------------------------------------------------------------------------
def test_presets_reproduce_the_official_token_counts():
    assert token_counts(resolve_schedule("low", 12, 197), 197)[1:] == [181 - 16 * i for i in range(11)] + [11]
    assert token_counts(resolve_schedule("high", 12, 197), 197)[1:] == [157, 123, 93, 69, 51, 37, 27, 19, 15, 11, 8, 5]
    assert token_counts(resolve_schedule("low", 24, 197), 197)[-2:] == [13, 7]
    assert token_counts(resolve_schedule("high", 24, 197), 197)[-1] == 5
    assert token_counts(resolve_schedule("low", 12, 198, protected=2), 198)[-1] == 42
    for key, table in PYRA_PRESETS.items():
        check_schedule(table, key[2], protected=2 if key[2] == 198 else 1)


@pytest.mark.parametrize("preset", ["low", "high"])
@pytest.mark.parametrize("layers,tokens,protected", [(2, 17, 1), (4, 65, 1), (6, 65, 1), (12, 65, 1), (12, 50, 2),
                                                     (24, 257, 1), (3, 10, 1)])
def test_scaled_presets_fit_every_geometry(preset, layers, tokens, protected):
    schedule = resolve_schedule(preset, layers, tokens, protected)
    assert len(schedule) == layers
    counts = check_schedule(schedule, tokens, protected)
    assert counts[-1] > protected
    if tokens > 20:
        assert counts[-1] < tokens / 2  # both presets compress substantially


def test_high_compresses_more_than_low():
    for layers, tokens in ((4, 65), (12, 197), (6, 101)):
        kept = {p: sum(token_counts(resolve_schedule(p, layers, tokens), tokens)) for p in ("low", "high")}
        assert kept["high"] < kept["low"], (layers, tokens, kept)


def test_constant_list_ramp_and_decreasing():
    assert resolve_schedule(8, 4, 65) == [8, 8, 8, 8]
    assert resolve_schedule([8, 6], 4, 65) == [8, 6, 0, 0]
    assert decreasing_schedule(8, 4) == [16, 10, 5, 0] == resolve_schedule({"r": 8, "inflect": -1}, 4, 65)
    assert ramp_schedule(8, 5, 0.0) == [8] * 5
    assert sum(decreasing_schedule(16, 12)) == pytest.approx(16 * 12, abs=12)


@pytest.mark.parametrize("bad", [-1, "medium", [1, -2], [1.5], {"r": 4, "x": 1}, {"inflect": 1}, True, 2.5])
def test_bad_schedule_specs_are_named(bad):
    with pytest.raises(ValueError, match="schedule|preset"):
        validate_spec(bad)


def test_check_schedule_names_layer_and_counts():
    with pytest.raises(ValueError, match=r"r=10 tokens in layer 3 \(vit.layers.3\), but only 17 tokens") as info:
        check_schedule([16, 16, 16, 10], 65, 1, layer_names=[f"vit.layers.{i}" for i in range(4)])
    assert "at most (17 - 1) // 2 = 8" in str(info.value)
    assert clamp_schedule([40, 40], 65, 1) == [32, 16]
    with pytest.raises(ValueError, match="has 3 entries but the model has 2 layers"):
        resolve_schedule([1, 1, 1], 2, 65)
