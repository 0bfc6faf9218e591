"""Property-based tests (hypothesis): random shapes and values keep the invariants of the pure cores and of config
validation. Example counts are sized to keep the whole file to about 20 s on one thread; run
``HYPOTHESIS_PROFILE=many pytest tests/test_properties.py`` (200x the examples) after changing a core."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile

import pytest
import torch

# hypothesis caches constants on disk: keep that out of the repository.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(tempfile.gettempdir(), "peft_effadapt-hypothesis"))

from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from peft_effadapt.merging import (
    PYRA_PRESETS,
    bipartite_soft_matching,
    check_schedule,
    clamp_schedule,
    decreasing_schedule,
    max_mergeable,
    merge_source,
    merge_wavg,
    ramp_schedule,
    resolve_schedule,
    scaled_preset,
    token_counts,
    validate_spec,
)
from peft_effadapt.tuners.consolidator.pattern import BranchPattern, shuffle_permutation, support_index

from method_cases import CASES

# No example database: nothing is written into the repository (.hypothesis/); failures print their example.
_COMMON = dict(deadline=None, database=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("default", max_examples=40, **_COMMON)
settings.register_profile("many", max_examples=8000, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

few = settings(max_examples=2000 if os.environ.get("HYPOTHESIS_PROFILE") == "many" else 25, deadline=None,
               database=None)

protected_st = st.integers(0, 2)
schedule_st = st.lists(st.integers(0, 40), min_size=1, max_size=24)


# == merging schedules and token counts ===========================================================================
@given(r=st.integers(0, 50), layers=st.integers(1, 32), tokens=st.integers(1, 600))
def test_constant_schedule_resolves_to_r_per_layer(r, layers, tokens):
    assert resolve_schedule(r, layers, tokens) == [r] * layers


@given(spec=schedule_st, extra=st.integers(0, 8))
def test_list_schedule_is_padded_with_zeros(spec, extra):
    resolved = resolve_schedule(spec, len(spec) + extra, 1000)
    assert resolved[: len(spec)] == spec and resolved[len(spec):] == [0] * extra


@given(r=st.integers(0, 40), layers=st.integers(1, 30), inflect=st.floats(-1, 1))
def test_ramp_schedule_is_monotone_between_its_ends(r, layers, inflect):
    ramp = ramp_schedule(r, layers, inflect)
    assert len(ramp) == layers and all(v >= 0 for v in ramp)
    pairs = list(zip(ramp, ramp[1:]))
    if inflect < 0:
        assert all(a >= b for a, b in pairs)
    elif inflect > 0:
        assert all(a <= b for a, b in pairs)
    else:
        assert ramp == [r] * layers
    if layers > 1:  # ends are symmetric about r, so the ramp never merges more than r per layer on average
        assert sum(ramp) <= r * layers


@given(r=st.integers(0, 40), layers=st.integers(2, 30))
def test_decreasing_schedule_goes_from_2r_to_0(r, layers):
    ramp = decreasing_schedule(r, layers)
    assert ramp[0] == 2 * r and ramp[-1] == 0


@given(schedule=schedule_st, tokens=st.integers(1, 600))
def test_token_counts_after_merging_are_n_minus_r(schedule, tokens):
    counts = token_counts(schedule, tokens)
    assert len(counts) == len(schedule) + 1 and counts[0] == tokens
    assert all(before - after == r for before, after, r in zip(counts, counts[1:], schedule))
    assert counts[-1] == tokens - sum(schedule)


@given(schedule=schedule_st, tokens=st.integers(1, 400), protected=protected_st)
def test_clamped_schedule_passes_the_50_percent_rule(schedule, tokens, protected):
    clamped = clamp_schedule(schedule, tokens, protected)
    assert all(0 <= c <= r for c, r in zip(clamped, schedule))
    counts = check_schedule(clamped, tokens, protected)  # never raises
    assert counts == token_counts(clamped, tokens)
    assert counts[-1] >= min(tokens, protected + 1)


@given(schedule=schedule_st, tokens=st.integers(1, 400), protected=protected_st)
def test_check_schedule_raises_exactly_when_clamping_changes_something(schedule, tokens, protected):
    clamped = clamp_schedule(schedule, tokens, protected)
    if clamped == schedule:
        assert check_schedule(schedule, tokens, protected) == token_counts(schedule, tokens)
    else:
        first = next(i for i, (a, b) in enumerate(zip(schedule, clamped)) if a != b)
        with pytest.raises(ValueError, match=f"layer {first}"):
            check_schedule(schedule, tokens, protected)


@given(preset=st.sampled_from(["low", "high"]), layers=st.integers(1, 40), tokens=st.integers(4, 1200),
       protected=protected_st)
def test_scaled_presets_respect_the_50_percent_rule_and_keep_tokens(preset, layers, tokens, protected):
    schedule = scaled_preset(preset, layers, tokens, protected)
    assert len(schedule) == layers and all(r >= 0 for r in schedule)
    counts = check_schedule(schedule, tokens, protected)
    assert counts[-1] >= protected + 1
    if (preset, layers, tokens) not in PYRA_PRESETS:
        assert resolve_schedule(preset, layers, tokens, protected) == schedule


@given(spec=st.one_of(st.integers(max_value=-1), st.booleans(), st.floats(), st.text(max_size=5).filter(
    lambda s: s not in ("low", "high")), st.lists(st.integers(max_value=-1), min_size=1, max_size=3)))
def test_bad_schedule_specs_raise_value_error(spec):
    with pytest.raises(ValueError):
        validate_spec(spec)


@given(spec=st.fixed_dictionaries({"r": st.integers(0, 64), "inflect": st.floats(allow_nan=True, allow_infinity=True)}))
def test_ramp_spec_with_any_float_inflect_is_resolved_or_refused_cleanly(spec):
    try:
        resolved = resolve_schedule(spec, 12, 197)
    except ValueError as err:
        assert "inflect" in str(err)
    else:
        assert len(resolved) == 12


# == token matching and merging ===================================================================================
@st.composite
def token_batches(draw):
    batch = draw(st.integers(1, 3))
    tokens = draw(st.integers(1, 40))
    channels = draw(st.integers(1, 8))
    protected = draw(protected_st)
    r = draw(st.integers(0, 25))
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, channels, generator=generator, dtype=torch.float64)
    size = torch.randint(1, 5, (batch, tokens, 1), generator=generator).to(torch.float64)
    return x, size, r, protected


@given(data=token_batches())
def test_merge_keeps_count_mass_and_protected_tokens(data):
    x, size, r, protected = data
    batch, tokens, _ = x.shape
    plan = bipartite_soft_matching(x, r, protected)
    expected_r = min(r, max_mergeable(tokens, protected))
    assert plan.r == expected_r and plan.num_tokens_after == tokens - expected_r
    merged, merged_size = merge_wavg(plan, x, size)
    assert merged.shape == (batch, tokens - expected_r, x.shape[-1])
    torch.testing.assert_close(merged_size.sum(1), size.sum(1))  # sizes still sum to N (weighted)
    torch.testing.assert_close((merged * merged_size).sum(1), (x * size).sum(1))  # size-weighted mass conserved
    for p in range(min(protected, tokens)):  # CLS (and the distillation token) keep position, value and size
        torch.testing.assert_close(merged[:, p], x[:, p])
        torch.testing.assert_close(merged_size[:, p], size[:, p])
    if plan.r:
        assert (plan.src_idx >= (1 if protected else 0)).all()


@given(data=token_batches(), steps=st.integers(1, 4))
def test_source_map_partitions_the_original_tokens(data, steps):
    x, _, r, protected = data
    batch, tokens, _ = x.shape
    size, source = None, None
    for _ in range(steps):
        plan = bipartite_soft_matching(x, r, protected)
        source = merge_source(plan, source, batch)
        x, size = merge_wavg(plan, x, size)
    assert torch.equal(source.sum(1), torch.ones(batch, tokens, dtype=source.dtype))  # each patch in one token
    torch.testing.assert_close(source.sum(-1, keepdim=True).to(size.dtype), size)  # size = patches held
    for p in range(min(protected, tokens)):
        assert source[:, p, p].eq(1).all() and source[:, p].sum(-1).eq(1).all()


@given(data=token_batches())
def test_merging_identical_tokens_changes_nothing_but_the_count(data):
    x, size, r, protected = data
    constant = x[:, :1].expand_as(x).clone()
    merged, _ = merge_wavg(bipartite_soft_matching(x, r, protected), constant, size)
    torch.testing.assert_close(merged, constant[:, : merged.shape[1]])


# == Consolidator's connectivity ==================================================================================
@st.composite
def patterns(draw):
    groups = draw(st.integers(1, 8))
    d_in = groups * draw(st.integers(1, 6))
    d_out = groups * draw(st.integers(1, 6))
    return BranchPattern(d_in, d_out, groups, draw(st.booleans()))


@given(channels_per_group=st.integers(1, 12), groups=st.integers(1, 12))
def test_shuffle_is_a_permutation_undone_by_the_transposed_shuffle(channels_per_group, groups):
    channels = channels_per_group * groups
    perm = shuffle_permutation(channels, groups)
    assert torch.equal(perm.sort().values, torch.arange(channels))
    inverse = shuffle_permutation(channels, channels_per_group)
    assert torch.equal(perm[inverse], torch.arange(channels))


@given(pattern=patterns())
def test_every_row_reads_one_group_and_every_input_is_read_out_per_group_times(pattern):
    mask = pattern.mask()
    assert mask.sum(1).eq(pattern.in_per_group).all()
    assert mask.sum(0).eq(pattern.out_per_group).all()
    columns = pattern.columns()
    assert all(len(set(row.tolist())) == pattern.in_per_group for row in columns)
    assert pattern.is_block_aligned() and int(mask.sum()) == pattern.out_features * pattern.in_per_group


@given(pattern=patterns(), seed=st.integers(0, 2**16))
def test_dense_scatter_matches_grouped_matmul(pattern, seed):
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(pattern.out_features, pattern.in_per_group, generator=generator, dtype=torch.float64)
    x = torch.randn(3, pattern.in_features, generator=generator, dtype=torch.float64)
    dense = pattern.dense(values)
    assert not dense[~pattern.mask()].any()
    reordered = x[:, pattern.input_order()]
    so, si, g = pattern.out_per_group, pattern.in_per_group, pattern.groups
    grouped = torch.einsum("bgi,goi->bgo", reordered.view(3, g, si), values.view(g, so, si)).reshape(3, -1)
    torch.testing.assert_close(x @ dense.T, grouped)


@given(groups=st.lists(st.integers(1, 4), min_size=1, max_size=3), base=st.integers(1, 3),
       shuffles=st.lists(st.booleans(), min_size=3, max_size=3))
def test_support_is_the_union_of_the_branch_masks(groups, base, shuffles):
    lcm = 12 * base
    branches = [BranchPattern(lcm, lcm, g, s) for g, s in zip(groups, shuffles)]
    union = torch.zeros(lcm, lcm, dtype=torch.bool)
    for branch in branches:
        union |= branch.mask()
    index = support_index(branches)
    assert torch.equal(index, union.flatten().nonzero().squeeze(1))
    assert torch.equal(support_index(branches + branches), index)


@given(groups=st.integers(1, 6), per_group=st.integers(1, 4), d_in_mult=st.integers(1, 4), shuffle=st.booleans())
def test_fused_qkv_rows_tile_the_virtual_layer(groups, per_group, d_in_mult, shuffle):
    d_out = groups * per_group
    assume((3 * d_out) % groups == 0)
    d_in = groups * d_in_mult
    parts = [BranchPattern(d_in, d_out, groups, shuffle, row_offset=i * d_out, virtual_rows=3 * d_out)
             for i in range(3)]
    fused = BranchPattern(d_in, 3 * d_out, groups, shuffle)
    torch.testing.assert_close(torch.cat([p.row_groups() for p in parts]), fused.row_groups())
    assert torch.equal(torch.cat([p.mask() for p in parts]), fused.mask())


@given(d_in=st.integers(1, 64), d_out=st.integers(1, 64), groups=st.integers(1, 64))
def test_group_count_that_does_not_divide_is_refused(d_in, d_out, groups):
    if d_in % groups or d_out % groups:
        with pytest.raises(ValueError, match="must divide"):
            BranchPattern(d_in, d_out, groups, False)
    else:
        assert BranchPattern(d_in, d_out, groups, False).in_per_group == d_in // groups


# == config validation ============================================================================================
def _first_case_per_type():
    chosen = {}
    for case in CASES:
        chosen.setdefault(case.make_config().peft_type.value, case)
    return list(chosen.values())


REPS = _first_case_per_type()
ANY_JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=2)),
    max_leaves=6,
)


@pytest.mark.parametrize("case", REPS, ids=[case.id for case in REPS])
@few
@given(data=st.data())
def test_any_json_value_in_any_field_is_accepted_or_refused_by_name(case, data):
    """Any JSON value in any one field: the config is built, or a ValueError/TypeError says which field (or what
    value) is wrong. Never another exception type (no KeyError, OverflowError, RecursionError...)."""
    fields = [f.name for f in dataclasses.fields(type(case.make_config())) if f.name != "peft_type"]
    name = data.draw(st.sampled_from(fields), label="field")
    value = data.draw(ANY_JSON, label="value")
    try:
        case.make_config(**{name: value})
    except (ValueError, TypeError) as err:
        message = str(err)
        assert len(message) < 2000
        assert name in message or name.replace("_", " ") in message or repr(value)[:20] in message \
            or str(value)[:20] in message, message


# == quantise / pack / unpack (peft_effadapt/quantization/) =======================================================
# Invariants: unpack(pack(i, b), b, n) == i for every b in 1..8; the packed length is ceil(b n / 8); indices outside
# 0..2^b-1 and byte counts that disagree with (n, b) are refused; K-means codebooks are sorted, have 2^b entries and
# every value maps to its nearest centroid; a quantiser's output values all lie in its stored codebook.
from peft_effadapt.quantization.kmeans import assign_nearest, kmeans_1d  # noqa: E402
from peft_effadapt.quantization.packing import pack_indices, packed_length, unpack_indices  # noqa: E402
from peft_effadapt.quantization.quantizers import KMeansQuantizer, UniformQuantizer  # noqa: E402


@given(bits=st.integers(1, 8), n=st.integers(0, 300), seed=st.integers(0, 2**16))
def test_pack_unpack_roundtrip(bits, n, seed):
    indices = torch.randint(0, 2**bits, (n,), generator=torch.Generator().manual_seed(seed))
    packed = pack_indices(indices, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_length(n, bits) == -(-bits * n // 8)
    assert torch.equal(unpack_indices(packed, bits, n), indices)


@given(bits=st.integers(1, 7), n=st.integers(1, 50))
def test_pack_refuses_out_of_range_and_unpack_refuses_wrong_lengths(bits, n):
    with pytest.raises(ValueError, match="must lie in"):
        pack_indices(torch.full((n,), 2**bits), bits)
    packed = pack_indices(torch.zeros(n, dtype=torch.long), bits)
    with pytest.raises(ValueError, match="bytes"):
        unpack_indices(torch.cat([packed, packed.new_zeros(1)]), bits, n)


@given(bits=st.integers(1, 4), n=st.integers(1, 200), seed=st.integers(0, 2**16))
def test_kmeans_codebook_is_sorted_and_assignment_is_nearest(bits, n, seed):
    values = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    codebook = kmeans_1d(values, 2**bits, max_iter=30)
    assert codebook.numel() == 2**bits and torch.equal(codebook, codebook.sort().values)
    nearest = (values[:, None] - codebook[None]).abs().min(1).values
    assigned = (values - codebook[assign_nearest(values, codebook)]).abs()
    torch.testing.assert_close(assigned, nearest)


@given(bits=st.integers(1, 4), shape=st.tuples(st.integers(1, 6), st.integers(1, 12)), seed=st.integers(0, 2**16),
       kind=st.sampled_from(["kmeans", "uniform"]))
def test_quantised_values_lie_in_the_stored_codebook(bits, shape, seed, kind):
    p = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    quantizer = KMeansQuantizer(bits=bits, max_iter=20) if kind == "kmeans" else UniformQuantizer(bits=bits)
    out = quantizer(p)
    assert out.values.shape == p.shape and out.codebook.numel() == 2**bits
    assert int(out.indices.min()) >= 0 and int(out.indices.max()) < 2**bits
    torch.testing.assert_close(out.values, out.codebook.to(p.dtype)[out.indices])


# == slimming plans (peft_effadapt/pruning/plan.py) ===============================================================
# Invariants: a plan composed with `then` selects the same channels as applying both plans in turn; composed clusters
# stay disjoint and contain their kept channel; to_dict/from_dict round-trips; validate refuses duplicate or
# out-of-range indices and empty groups.
from peft_effadapt.pruning.groups import ChannelGroup  # noqa: E402
from peft_effadapt.pruning.plan import GroupPlan, SlimmingPlan  # noqa: E402


def _group(size: int) -> ChannelGroup:
    return ChannelGroup(name="g", producers=[("layer", "linear")], norms=[], consumers=["next"], size=size)


@st.composite
def clustered_plans(draw, size):
    """A GroupPlan over `size` channels: a random partition into clusters, one kept member per cluster."""
    labels = draw(st.lists(st.integers(0, size - 1), min_size=size, max_size=size))
    clusters = [sorted(i for i in range(size) if labels[i] == c) for c in sorted(set(labels))]
    keep = [draw(st.sampled_from(c)) for c in clusters]
    with_clusters = draw(st.booleans())
    if not with_clusters:
        keep = sorted(draw(st.lists(st.integers(0, size - 1), min_size=1, max_size=size, unique=True)))
    return GroupPlan(_group(size), keep, clusters if with_clusters else None)


@given(data=st.data(), size=st.integers(1, 24))
def test_composed_plan_equals_applying_both(data, size):
    first = data.draw(clustered_plans(size))
    second = data.draw(clustered_plans(first.width))
    composed = SlimmingPlan([first]).then(SlimmingPlan([second]))
    composed.validate()
    step = composed["g"]
    channels = torch.arange(size)
    assert step.keep == channels[first.keep][second.keep].tolist()
    if step.clusters is not None:
        members = [i for cluster in step.clusters for i in cluster]
        assert len(members) == len(set(members))
        assert all(k in c for k, c in zip(step.keep, step.clusters))


@given(data=st.data(), size=st.integers(1, 24))
def test_plan_dict_roundtrip(data, size):
    plan = SlimmingPlan([data.draw(clustered_plans(size))], method="csgd", metadata={"seed": 1})
    again = SlimmingPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again.to_dict() == plan.to_dict()


@given(size=st.integers(1, 16), keep=st.lists(st.integers(-3, 20), max_size=8))
def test_plan_validation_refuses_bad_indices(size, keep):
    plan = GroupPlan(_group(size), keep)
    if keep and len(set(keep)) == len(keep) and min(keep) >= 0 and max(keep) < size:
        plan.validate()
    else:
        with pytest.raises(ValueError, match="'g'"):
            plan.validate()


# == samplers' budgets (peft_effadapt/active/) ====================================================================
# Invariants: a budget schedule has one non-negative entry per round summing to the total budget, and a budget over
# the pool size is refused; every sampler returns exactly n distinct ids of the pool, lowest score first; the random
# sampler depends only on (seed, round); the contrastive sampler's state round-trips through state_dict.
from peft_effadapt.active.budget import budget_schedule  # noqa: E402
from peft_effadapt.active.samplers import SAMPLERS, ContrastiveActiveSampler  # noqa: E402


@given(n_pool=st.integers(0, 5000), rounds=st.integers(1, 12), ratio=st.floats(0, 0.2))
def test_budget_schedule_sums_to_the_budget(n_pool, rounds, ratio):
    total = round(n_pool * ratio * rounds)
    if total > n_pool:
        with pytest.raises(ValueError, match="exceeds the pool"):
            budget_schedule(n_pool, rounds, ratio_per_round=ratio)
        return
    schedule = budget_schedule(n_pool, rounds, ratio_per_round=ratio)
    assert len(schedule) == rounds and all(n >= 0 for n in schedule) and sum(schedule) == total


@given(n_pool=st.integers(0, 5000), rounds=st.integers(1, 12), budget=st.integers(0, 5000))
def test_budget_schedule_with_total_budget(n_pool, rounds, budget):
    if budget > n_pool:
        with pytest.raises(ValueError):
            budget_schedule(n_pool, rounds, total_budget=budget)
        return
    schedule = budget_schedule(n_pool, rounds, total_budget=budget)
    assert len(schedule) == rounds and min(schedule) >= 0 and sum(schedule) == budget


@st.composite
def pools(draw):
    size = draw(st.integers(1, 40))
    classes = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randperm(1000, generator=generator)[:size]
    probs = torch.softmax(torch.randn(size, classes, generator=generator) * 3, dim=1)
    return ids, probs, draw(st.integers(0, size))


@given(pool=pools(), name=st.sampled_from(sorted(SAMPLERS)), seed=st.integers(0, 100))
def test_samplers_return_n_distinct_pool_ids_lowest_score_first(pool, name, seed):
    ids, probs, n = pool
    selection = SAMPLERS[name]().select(ids, probs, n, round_idx=1, seed=seed)
    assert len(selection.pool_ids) == n == len(set(selection.pool_ids))
    assert set(selection.pool_ids) <= set(ids.tolist())
    assert selection.scores == sorted(selection.scores)
    if name == "random":
        again = SAMPLERS[name]().select(ids, probs, n, round_idx=1, seed=seed)
        assert again.pool_ids == selection.pool_ids


@given(pool=pools(), next_probs_seed=st.integers(0, 2**16))
def test_contrastive_sampler_state_roundtrip_gives_the_same_next_query(pool, next_probs_seed):
    ids, probs, n = pool
    sampler = ContrastiveActiveSampler()
    first = sampler.select(ids, probs, n)
    left = torch.tensor([i for i in ids.tolist() if i not in set(first.pool_ids)], dtype=torch.long)
    assume(left.numel() > 0)
    generator = torch.Generator().manual_seed(next_probs_seed)
    later = torch.softmax(torch.randn(left.numel(), probs.shape[1], generator=generator), dim=1)
    resumed = ContrastiveActiveSampler()
    resumed.load_state_dict({k: v.clone() for k, v in sampler.state_dict().items()})
    k = left.numel() // 2
    assert resumed.select(left, later, k).pool_ids == sampler.select(left, later, k).pool_ids
