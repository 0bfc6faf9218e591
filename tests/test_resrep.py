"""ResRep: compactor fold exactness, the gradient rule, the mask schedule, and the callback under the Trainer
(checkpoint resume, fp16 loss scale, bf16, gradient accumulation, 2-process accelerate launch)."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
import types
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from datasets import Dataset
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Trainer, TrainingArguments

from peft_effadapt import testing
from peft_effadapt.pruning import (
    FlopsModel,
    ResRepCallback,
    count_flops,
    find_channel_groups,
    load_slimmed,
    resrep_param_groups,
    save_slimmed,
)
from peft_effadapt.pruning.resrep.schedule import choose_masks
from peft_effadapt.testing import randomize_batchnorm, tiny_vit

from fp32 import assert_fp32_close, fp32_atol

tiny_resnet = partial(testing.tiny_resnet, random_batchnorm=True)  # BN statistics that make mistakes visible

REPO = Path(__file__).resolve().parents[1]


def out(model, x):
    with torch.no_grad():
        result = model(**x) if isinstance(x, dict) else model(x)
    return getattr(result, "logits", result)


def perturb_and_zero_rows(cb, rows=(1,), noise=0.05):
    with torch.no_grad():
        for compactor in cb.compactors.values():
            compactor.weight.add_(noise * torch.randn_like(compactor.weight))
            compactor.weight[list(rows)] = 0
            compactor.mask[list(rows)] = 0


# ------------------------------------------------------------------------------------------------- R1, R2, R6: fold
@pytest.mark.parametrize("bias", [True, False])
def test_fold_plain_cnn_is_exact(bias):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, bias=bias), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    randomize_batchnorm(net)
    x = torch.randn(4, 3, 10, 10)
    cb = ResRepCallback(flops_target=0.9, drop_masked_rows=True)
    cb.prepare(net, x)
    perturb_and_zero_rows(cb, rows=(2, 5))
    before = out(net, x)
    plan = cb.slim()
    assert plan.widths == {"0": 6} and net[0].out_channels == 6 and net[3].in_channels == 6
    assert cb.conversion_error < 1e-5
    assert_fp32_close(out(net, x), before)
    assert not any("resrep" in k for k in net.state_dict())


def test_hf_resnet_identity_insertion_conversion_and_reload(tmp_path):
    model = tiny_resnet()
    x = {"pixel_values": torch.randn(2, 3, 32, 32)}
    stock_keys = set(model.state_dict())
    reference = out(model, x)
    cb = ResRepCallback(flops_target=0.9)
    cb.prepare(model, x)
    assert torch.equal(out(model, x), reference)  # identity compactors: delta exactly 0
    added = set(model.state_dict()) - stock_keys
    assert stock_keys <= set(model.state_dict()) and all(".resrep_compactor." in k for k in added)
    assert sorted(cb.compactors) == sorted(g.name for g in find_channel_groups(model) if g.meta.get("role") == "block")
    perturb_and_zero_rows(cb, rows=(0, 2))
    before = out(model, x)
    plan = cb.slim()
    assert set(model.state_dict()) == stock_keys
    assert all(w == g.size - 2 for w, g in zip(plan.widths.values(), (p.group for p in plan.groups)))
    assert_fp32_close(out(model, x), before)
    assert cb.final_flops_ratio == count_flops(model, x) / cb.flops.baseline
    from peft_effadapt.pruning import save_slimmed

    save_slimmed(model, cb.plan, tmp_path)
    assert torch.equal(out(load_slimmed(tmp_path), x), out(model, x))


@pytest.mark.parametrize("layer_type", ["basic", "bottleneck"])
@pytest.mark.parametrize("family", ["streams", "all"])
def test_residual_stream_compactors_are_shared_fold_exactly_and_reload_in_a_fresh_process(tmp_path, layer_type, family):
    """Beyond the paper: one compactor per residual stream, applied after every producer's BatchNorm (projection or
    stem and the last conv of each block); zero rows remove the channel from the whole stream, exactly."""
    model = tiny_resnet(layer_type)
    x = {"pixel_values": torch.randn(2, 3, 32, 32)}
    groups = find_channel_groups(model)
    reference = out(model, x)
    cb = ResRepCallback(flops_target=0.9, groups=family, drop_masked_rows=True)
    cb.prepare(model, x)
    assert torch.equal(out(model, x), reference)
    streams = [g for g in groups if g.residual and g.prunable]
    assert {g.name for g in streams} <= set(cb.compactors)
    assert (family == "all") == any(g.meta.get("role") == "block" for g in cb.targets)
    stream = max(streams, key=lambda g: len(g.producers))
    assert len(stream.producers) > 1 and len(model.state_dict()) == len(set(model.state_dict()))
    compactor = cb.compactors[stream.name]
    assert sum(p is compactor.weight for p in model.parameters()) == 1  # one parameter, shared by all producers
    perturb_and_zero_rows(cb, rows=(0, 2))
    before = out(model, x)
    plan = cb.slim()
    assert plan[stream.name].width == stream.size - 2
    for path, _ in stream.producers:
        assert model.get_submodule(path).out_channels == stream.size - 2
    assert not any("resrep" in k for k in model.state_dict())
    scale = max(1.0, float(before.abs().max()))
    torch.testing.assert_close(out(model, x), before, atol=1e-5 * scale, rtol=1e-5)
    assert cb.conversion_error <= 1e-5 * scale
    save_slimmed(model, None, tmp_path / "slim")
    save_file({"x": x["pixel_values"]}, str(tmp_path / "x.safetensors"))
    code = (f"import torch\nfrom safetensors.torch import load_file, save_file\n"
            f"from peft_effadapt.pruning import load_slimmed\nm = load_slimmed({str(tmp_path / 'slim')!r})\n"
            f"with torch.no_grad():\n    y = m(load_file({str(tmp_path / 'x.safetensors')!r})['x']).logits\n"
            f"save_file({{'y': y.contiguous()}}, {str(tmp_path / 'y.safetensors')!r})\n")
    # same thread count as this process (conftest): the same kernels, so the reload is bit-identical
    subprocess.run([sys.executable, "-c", code], check=True,
                   env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(torch.get_num_threads())})
    assert torch.equal(load_file(str(tmp_path / "y.safetensors"))["y"], out(model, x))


def test_vit_mlp_fold_is_exact():
    model = tiny_vit(num_labels=3).eval()
    x = {"pixel_values": torch.randn(2, 3, 32, 32)}
    cb = ResRepCallback(flops_target=0.95, groups="internal", drop_masked_rows=True)
    with pytest.warns(UserWarning, match="larger than the layer"):
        cb.prepare(model, x)
    perturb_and_zero_rows(cb, rows=range(0, 64, 3))
    before = out(model, x)
    cb.slim()
    assert model.vit.layers[0].mlp.fc1.out_features == 42 and model.vit.layers[1].mlp.fc2.in_features == 42
    assert_fp32_close(out(model, x), before)


# ------------------------------------------------------------------------------------------------- R3: gradient
def test_gradient_rule_masks_only_the_task_term_and_survives_zero_rows():
    model = tiny_resnet()
    cb = ResRepCallback(flops_target=0.9, lasso_strength=0.3)
    cb.prepare(model, {"pixel_values": torch.randn(2, 3, 32, 32)})
    compactor = next(iter(cb.compactors.values()))
    with torch.no_grad():
        compactor.weight.add_(0.1 * torch.randn_like(compactor.weight))
        compactor.weight[3] = 0
    compactor.mask[[0, 3]] = 0
    task = torch.randn_like(compactor.weight)
    compactor.weight.grad = task.clone()
    cb.apply_gradient_rule()
    q = compactor.weight.detach()
    lasso = 0.3 * q / q.norm(dim=1, keepdim=True).clamp_min(1e-12)
    torch.testing.assert_close(compactor.weight.grad[0], lasso[0], rtol=0, atol=0)
    assert torch.equal(compactor.weight.grad[3], torch.zeros(4))  # zero row: no NaN, no task gradient
    torch.testing.assert_close(compactor.weight.grad[1:3], task[1:3] + lasso[1:3])


def test_fp16_loss_scale_multiplies_the_lasso_like_the_task_gradient():
    """Shared policy with C-SGD: the regulariser is added scaled by the pending loss scale, so the gradient the
    optimizer sees after accelerate's unscale is task + lasso."""
    model = tiny_resnet()
    cb = ResRepCallback(flops_target=0.9, lasso_strength=0.1)
    cb.prepare(model, {"pixel_values": torch.randn(2, 3, 32, 32)})
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(torch.tensor(1.0))  # as the backward of a scaled loss would
    task = {id(c): torch.randn_like(c.weight) for c in cb.compactors.values()}
    for c in cb.compactors.values():
        c.weight.grad = task[id(c)] * 1024.0
    cb.on_pre_optimizer_step(None, None, None, optimizer=types.SimpleNamespace(scaler=scaler, optimizer=inner))
    scaler.unscale_(inner)
    for c in cb.compactors.values():
        lasso = 0.1 * c.weight.detach() / c.weight.detach().norm(dim=1, keepdim=True)
        torch.testing.assert_close(c.weight.grad, task[id(c)] + lasso)


# ------------------------------------------------------------------------------------------------- R4: schedule
def test_mask_schedule_granularity_target_minimum_and_unmasking():
    model = tiny_resnet("basic", depths=(1, 1), hidden_sizes=(32, 64))
    x = {"pixel_values": torch.randn(1, 3, 32, 32)}
    groups = [g for g in find_channel_groups(model) if g.meta.get("role") == "block"]
    flops = FlopsModel.measure(model, x, find_channel_groups(model))
    gen = torch.Generator().manual_seed(0)
    norms = {g.name: torch.rand(g.size, generator=gen) for g in groups}
    target, masks, rounds = 0.6, None, 0
    while True:
        rounds += 1
        previous = masks or {n: torch.ones_like(v) for n, v in norms.items()}
        masks = choose_masks(norms, flops, target, current=previous, granularity=4, min_channels={groups[0].name: 30})
        newly = sum(int(((m == 0) & (p == 1)).sum()) for m, p in zip(masks.values(), previous.values()))
        widths = {n: int(m.sum()) for n, m in masks.items()}
        if flops.ratio({n: int(p.sum()) for n, p in previous.items()}) > target:
            assert sum(int((m == 0).sum()) for m in masks.values()) <= \
                sum(int((p == 0).sum()) for p in previous.values()) + 4
        assert widths[groups[0].name] >= 30 and newly <= 4 or rounds == 1
        if flops.ratio(widths) <= target:
            break
        assert rounds < 500
        for name, mask in masks.items():  # as training would: masked rows decay under the lasso
            norms[name][mask == 0] *= 0.01
    assert rounds > 10 and widths[groups[0].name] >= 30
    # a masked channel whose norm grows is freed
    name = groups[1].name
    freed = int(torch.nonzero(masks[name] == 0)[0])
    norms[name][freed] = 10.0
    again = choose_masks(norms, flops, target, current=masks)
    assert again[name][freed] == 1 and flops.ratio({n: int(m.sum()) for n, m in again.items()}) <= target


def test_round_to_keeps_mask_widths_at_multiples():
    model = tiny_resnet("basic", depths=(1, 1), hidden_sizes=(32, 64))
    x = {"pixel_values": torch.randn(1, 3, 32, 32)}
    groups = [g for g in find_channel_groups(model) if g.meta.get("role") == "block"]
    flops = FlopsModel.measure(model, x, find_channel_groups(model))
    norms = {g.name: torch.rand(g.size) for g in groups}
    masks = choose_masks(norms, flops, 0.6, granularity=10 ** 6, round_to=8)
    widths = {n: int(m.sum()) for n, m in masks.items()}
    assert all(w % 8 == 0 for w in widths.values()) and flops.ratio(widths) <= 0.6


def _chain_flops(sizes: list[int]) -> FlopsModel:
    """Exact FLOPs model of a plain conv chain 3 -> g0 -> g1 -> ... -> 10 (coefficient 2 per MAC)."""
    from peft_effadapt.pruning.flops import _Term

    names = [f"g{i}" for i in range(len(sizes))]
    terms = [_Term(2, None, 1, 3, names[0], sizes[0])]
    terms += [_Term(2, names[i - 1], 1, sizes[i - 1], names[i], sizes[i]) for i in range(1, len(sizes))]
    terms.append(_Term(2, names[-1], 1, sizes[-1], None, 10))
    baseline = sum(t.coeff * (t.in_fixed * t.in_mult) * t.out_fixed for t in terms)
    return FlopsModel(baseline, terms, dict(zip(names, sizes)))


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(sizes=st.lists(st.integers(4, 48), min_size=2, max_size=5), round_to=st.sampled_from([None, 2, 4, 8, 16]),
       granularity=st.integers(1, 8), target=st.floats(0.2, 0.95), seed=st.integers(0, 2 ** 16),
       ties=st.booleans())
def test_mask_schedule_reaches_target_under_any_round_to(sizes, round_to, granularity, target, seed, ties):
    """With fixed norms, repeated updates mask a growing set (each update above target masks >= `granularity`
    more channels, or all it may) until the FLOPs target, within ceil(maskable / granularity) + 1 updates; every
    width is a multiple of `round_to` (or the full size) and at least the minimum."""
    from peft_effadapt.pruning.flops import round_to as rounded

    flops = _chain_flops(sizes)
    gen = torch.Generator().manual_seed(seed)
    norms = {n: (torch.randint(0, 3, (s,), generator=gen).float() if ties else torch.rand(s, generator=gen))
             for n, s in flops.sizes.items()}
    floor = {n: rounded(1, round_to, s) for n, s in flops.sizes.items()}
    assume(flops.ratio(floor) <= target)
    maskable = sum(s - floor[n] for n, s in flops.sizes.items())
    masks = {n: torch.ones_like(v) for n, v in norms.items()}
    limit = maskable // granularity + 2
    for _ in range(limit):
        before = {n: int((m == 0).sum()) for n, m in masks.items()}
        was_above = flops.ratio({n: int(m.sum()) for n, m in masks.items()}) > target
        masks = choose_masks(norms, flops, target, current=masks, granularity=granularity, min_channels=floor,
                             round_to=round_to)
        widths = {n: int(m.sum()) for n, m in masks.items()}
        for n, w in widths.items():
            assert w == rounded(w, round_to, flops.sizes[n]) and w >= floor[n]
        masked = sum(flops.sizes[n] - w for n, w in widths.items())
        if flops.ratio(widths) <= target:
            break
        assert was_above and masked >= sum(before.values()) + granularity
    else:
        raise AssertionError(f"target {target} not reached after {limit} updates: {widths}")
    # at target the choice is stable: a further update keeps exactly these masks
    again = choose_masks(norms, flops, target, current=masks, granularity=granularity, min_channels=floor,
                         round_to=round_to)
    assert all(torch.equal(again[n], masks[n]) for n in masks)


@pytest.mark.parametrize("round_to", [2, 4])
def test_callback_update_masks_with_round_to_reaches_target(round_to):
    """The issue-17 reproduction: fixed compactor norms, repeated `update_masks()` with `round_to` (was stuck at 1.0)."""
    model = tiny_resnet("basic", depths=(1, 1), hidden_sizes=(32, 64))
    x = {"pixel_values": torch.randn(1, 3, 32, 32)}
    cb = ResRepCallback(flops_target=0.6, mask_interval=1, warmup_steps=4, begin_granularity=16, round_to=round_to)
    cb.prepare(model, x)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for compactor in cb.compactors.values():
            compactor.weight.mul_(torch.rand(compactor.weight.shape[0], 1, generator=gen))
    ratios = []
    for _ in range(40):
        widths = cb.update_masks()
        ratios.append(cb.masked_flops_ratio)
        if cb.masked_flops_ratio <= 0.6:
            break
    assert ratios[-1] <= 0.6 and ratios == sorted(ratios, reverse=True)
    assert all(w % round_to == 0 for w in widths.values())


# ------------------------------------------------------------------------------------------------- bad input
def test_unreachable_target_and_nothing_to_prune_leave_the_model_untouched():
    model = tiny_resnet()
    keys = set(model.state_dict())
    x = {"pixel_values": torch.randn(1, 3, 32, 32)}
    with pytest.raises(ValueError, match="unreachable"):
        ResRepCallback(flops_target=0.05).prepare(model, x)
    with pytest.raises(ValueError, match="Nothing to prune"):
        ResRepCallback(groups=["nomatch*"]).prepare(model, x)
    with pytest.raises(ValueError, match="groups must be one of"):
        ResRepCallback(groups="mlp")
    assert set(model.state_dict()) == keys
    with pytest.raises(ValueError, match="No prunable"):
        ResRepCallback().prepare(nn.Sequential(nn.Linear(3, 2)), torch.randn(1, 3))
    with pytest.raises(ValueError, match="flops_target"):
        ResRepCallback(flops_target=1.5)


def test_sharded_training_and_late_compactors_are_refused(tmp_path):
    cb = ResRepCallback(flops_target=0.9)
    with pytest.raises(ValueError, match="FSDP and DeepSpeed"):
        cb.on_train_begin(types.SimpleNamespace(fsdp="full_shard", deepspeed=None), None, None)
    model = tiny_resnet()
    data = noise_dataset(32)
    with pytest.raises(RuntimeError, match="prepare"):
        Trainer(model=model, args=args(tmp_path, max_steps=1), train_dataset=data, callbacks=[cb]).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # built before prepare(): misses the compactors
    cb.prepare(model, {"pixel_values": data[:2]["pixel_values"]})
    with pytest.raises(ValueError, match="does not update ResRep's parameters"):
        Trainer(model=model, args=args(tmp_path, max_steps=1), train_dataset=data, callbacks=[cb],
                optimizers=(optimizer, None)).train()
    with pytest.raises(ValueError, match="needs torch.optim.SGD.*lasso_strength no longer is the paper's lambda"):
        Trainer(model=model, args=args(tmp_path, max_steps=1), train_dataset=data, callbacks=[cb]).train()  # AdamW


# ------------------------------------------------------------------------------------------------- Trainer runs
def noise_dataset(n, size=16, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, n)
    pixels = rng.normal(0, 1, (n, 3, size, size)).astype(np.float32)
    pixels[np.arange(n), labels % 3] += 0.8
    return Dataset.from_dict({"pixel_values": pixels, "labels": labels}).with_format("torch")


def args(out_dir, **kw):
    base = dict(output_dir=str(out_dir), per_device_train_batch_size=16, learning_rate=0.05, report_to=[],
                save_strategy="no", use_cpu=True, seed=0, max_grad_norm=0, disable_tqdm=True, logging_steps=1000,
                lr_scheduler_type="cosine", train_sampling_strategy="sequential", dataloader_num_workers=0)
    return TrainingArguments(**{**base, **kw})


def assert_lossless_conversion(model, cb):
    """The slimming at the end of a Trainer run changed the outputs on the callback's example inputs by no more than
    fp32 rounding: folding BatchNorm and compactor into the producers is exact in real arithmetic, and the only rows
    dropped (norm < conversion_threshold = 1e-5, masked rows above it are kept) contribute at most 1e-5 of their
    input's size. The callback itself only warns above this bound."""
    assert cb.conversion_error <= fp32_atol(out(model.eval(), cb.example_inputs))


@pytest.fixture
def fresh_accelerate_state():
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def run_resnet(out_dir, max_steps=40, resume=None, **kw):
    model = tiny_resnet("basic", depths=(1, 1), hidden_sizes=(16, 32)).train()
    data = noise_dataset(160)
    cb = ResRepCallback(flops_target=0.7, lasso_strength=0.05, mask_interval=4, warmup_steps=4, begin_granularity=12,
                        **kw)
    cb.prepare(model, {"pixel_values": data[:8]["pixel_values"]})
    optimizer = torch.optim.SGD(resrep_param_groups(model, lr=0.05, compactor_momentum=0.9), lr=0.05,
                                momentum=0.9)
    trainer = Trainer(model=model, args=args(out_dir, max_steps=max_steps, save_strategy="steps", save_steps=20),
                      train_dataset=data, callbacks=[cb], optimizers=(optimizer, None))
    trainer.train(resume_from_checkpoint=resume)
    return model, cb


def test_trainer_masks_reach_target_convert_and_save(tmp_path, fresh_accelerate_state):
    model, cb = run_resnet(tmp_path)
    assert cb.target_reached_step is not None and cb.masked_flops_ratio <= 0.7
    assert cb.mask_updates == (40 - 4) // 4 and cb.plan.method == "resrep"
    x = {"pixel_values": noise_dataset(160)[:8]["pixel_values"]}
    assert cb.final_flops_ratio == pytest.approx(count_flops(model, x) / cb.flops.baseline)
    assert cb.conversion_error == cb.plan.metadata["conversion_max_abs_error"]
    assert_lossless_conversion(model, cb)
    reloaded = load_slimmed(tmp_path / "slimmed")
    assert torch.equal(out(reloaded, x), out(model.eval(), x))


def test_resume_from_checkpoint_restores_masks_and_counters(tmp_path, fresh_accelerate_state):
    _, full = run_resnet(tmp_path / "a", slim_on_train_end=False)
    checkpoint = load_file(tmp_path / "a" / "checkpoint-20" / "model.safetensors")
    assert any(k.endswith("resrep_compactor.mask") and (v == 0).any() for k, v in checkpoint.items())
    AcceleratorState._reset_state(reset_partial_state=True)
    _, resumed = run_resnet(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-20"), slim_on_train_end=False)
    assert resumed.mask_updates == full.mask_updates and resumed.target_reached_step == full.target_reached_step
    for name, compactor in full.compactors.items():
        assert torch.equal(resumed.compactors[name].mask, compactor.mask)
        assert_fp32_close(resumed.compactors[name].weight, compactor.weight)


def run_vit(out_dir, batch, accumulation=1, **kw):
    model = tiny_vit(num_labels=3)
    data = noise_dataset(96, size=32)
    data = data.map(lambda row: {"labels": row["labels"] % 3})
    cb = ResRepCallback(flops_target=0.9, groups="internal", lasso_strength=0.05, mask_interval=2,
                        warmup_steps=2, begin_granularity=32)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cb.prepare(model, {"pixel_values": data[:4]["pixel_values"]})
    optimizer = torch.optim.SGD(resrep_param_groups(model, lr=0.05, compactor_momentum=0.9), lr=0.05,
                                momentum=0.9)
    trainer = Trainer(model=model, args=args(out_dir, max_steps=6, per_device_train_batch_size=batch,
                                             gradient_accumulation_steps=accumulation, **kw),
                      train_dataset=data, callbacks=[cb], optimizers=(optimizer, None))
    trainer.train()
    return model, cb


def test_gradient_accumulation_matches_the_full_batch(tmp_path, fresh_accelerate_state):
    model_one, one = run_vit(tmp_path / "a", batch=16)
    AcceleratorState._reset_state(reset_partial_state=True)
    model_two, two = run_vit(tmp_path / "b", batch=8, accumulation=2)
    assert one.plan.to_dict()["groups"] == two.plan.to_dict()["groups"]
    assert one.mask_updates == two.mask_updates == 2 and one.target_reached_step == two.target_reached_step
    assert_lossless_conversion(model_one, one)
    assert_lossless_conversion(model_two, two)
    for (key, value), (key2, value2) in zip(model_one.state_dict().items(), model_two.state_dict().items()):
        assert key == key2
        torch.testing.assert_close(value, value2, atol=1e-5, rtol=1e-5)


def test_bf16_autocast_run_converts(tmp_path, fresh_accelerate_state):
    model, cb = run_vit(tmp_path, batch=16, bf16=True)
    assert cb.target_reached_step is not None and cb.plan is not None
    assert model.vit.layers[0].mlp.fc1.weight.dtype == torch.float32
    assert_lossless_conversion(model, cb)


DDP_SCRIPT = """
import sys, warnings
import numpy as np, torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments
from peft_effadapt.pruning import ResRepCallback, resrep_param_groups
from peft_effadapt.testing import tiny_vit


def run(out_dir, batch):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = tiny_vit(num_labels=3)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 96)
    pixels = rng.normal(0, 1, (96, 3, 32, 32)).astype(np.float32)
    pixels[np.arange(96), labels] += 0.8
    data = Dataset.from_dict({"pixel_values": pixels, "labels": labels}).with_format("torch")
    cb = ResRepCallback(flops_target=0.9, groups="internal", lasso_strength=0.05, mask_interval=2,
                        warmup_steps=2, begin_granularity=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cb.prepare(model, {"pixel_values": data[:4]["pixel_values"]})
    optimizer = torch.optim.SGD(resrep_param_groups(model, lr=0.05, compactor_momentum=0.9), lr=0.05,
                                momentum=0.9)
    args = TrainingArguments(output_dir=out_dir, max_steps=6, per_device_train_batch_size=batch, learning_rate=0.05,
                             report_to=[], save_strategy="no", use_cpu=True, seed=0, max_grad_norm=0,
                             disable_tqdm=True, lr_scheduler_type="cosine", train_sampling_strategy="sequential",
                             dataloader_num_workers=0)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[cb], optimizers=(optimizer, None)).train()
    return model, cb


if __name__ == "__main__":
    run(sys.argv[1], int(sys.argv[2]))
    import torch.distributed as dist

    print(f"world_size={dist.get_world_size()} backend={dist.get_backend()}" if dist.is_initialized() else "single")
"""


def test_two_process_accelerate_launch_matches_one_process(tmp_path, fresh_accelerate_state):
    script = tmp_path / "resrep_ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # `--cpu --num_processes 2` starts ONE process in accelerate 1.15 (no RANK/WORLD_SIZE); `--multi_gpu` goes through
    # torchrun and, without CUDA and with use_cpu=True, gives two gloo processes.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script),
           str(tmp_path / "ddp"), "8"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("world_size=2 backend=gloo") == 2, result.stdout[-2000:]
    model, cb = runpy.run_path(str(script))["run"](str(tmp_path / "one"), 16)
    ddp = load_slimmed(tmp_path / "ddp" / "slimmed")
    from peft_effadapt.pruning import SlimmingPlan

    assert SlimmingPlan.load(tmp_path / "ddp" / "slimmed").to_dict()["groups"] == cb.plan.to_dict()["groups"]
    for (key, value), (key2, value2) in zip(ddp.state_dict().items(), model.state_dict().items()):
        assert key == key2
        torch.testing.assert_close(value, value2, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------- R5 (slow)
@pytest.mark.slow
def test_dynamics_masked_rows_decay_and_conversion_is_lossless():
    """The spec's R5 prototype: lambda is 10x the paper's so that 3000 steps suffice (say so: lambda, lr, compactor
    momentum and the 1e-5 threshold are coupled)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    x, y = torch.randn(256, 3, 8, 8), torch.randint(0, 4, (256,))
    steps = 3000
    cb = ResRepCallback(flops_target=0.5, groups=["0", "3"], lasso_strength=1e-3, mask_interval=5,
                        warmup_steps=10, begin_granularity=4, freeze_masks_after=0.3)
    cb.prepare(net, x[:16])
    optimizer = torch.optim.SGD(resrep_param_groups(net, lr=0.05), lr=0.05, momentum=0.9)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    state = types.SimpleNamespace(max_steps=steps, num_train_epochs=1, global_step=0, stateful_callbacks={})
    cb.on_train_begin(types.SimpleNamespace(fsdp=None, deepspeed=None), state, None, optimizer=optimizer)
    net.train()
    for step in range(steps):
        idx = torch.arange(step * 64, step * 64 + 64) % 256
        loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        cb.on_pre_optimizer_step(None, state, None, optimizer=optimizer)
        optimizer.step()
        schedule.step()
        state.global_step = step + 1
        cb.on_step_end(None, state, None)
    masked = torch.cat([c.row_norms()[c.mask == 0] for c in cb.compactors.values()])
    assert masked.max() < 1e-5 and cb.masked_flops_ratio <= 0.5
    widths = {n: int(c.mask.sum()) for n, c in cb.compactors.items()}
    net.eval()
    plan = cb.slim()
    assert plan.widths == widths and cb.final_flops_ratio <= 0.5
    assert cb.conversion_error <= 1e-5
