"""Aligned widths (`round_to="auto"`) and the inference placement of `load_slimmed` (device, dtype, channels_last):
the rounding rules, FLOPs budgets met with rounded widths, lossless slimming with aligned widths (C-SGD trim and
ResRep conversion against the unslimmed model, fp32 tolerance), and clear errors for bad values."""

from __future__ import annotations

import pytest
import torch
from test_csgd import project_onto_cluster_means
from test_resrep import perturb_and_zero_rows
from torch import nn

from peft_effadapt.pruning import (
    CentripetalSGDCallback,
    CSGDConfig,
    FlopsModel,
    ResRepCallback,
    ResRepConfig,
    aligned_multiple,
    apply_plan,
    count_flops,
    find_channel_groups,
    load_slimmed,
    plan_from_widths,
    save_slimmed,
    width_multiple,
    widths_for_flops,
)
from peft_effadapt.pruning.flops import CPU_MULTIPLE
from peft_effadapt.testing import tiny_resnet

from fp32 import assert_fp32_close

X = {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))}


def wide_resnet():
    """Channel groups of 32 to 128 (16 and 32 inside the blocks): room for multiples of 8 and 16."""
    return tiny_resnet("bottleneck", embedding_size=32, hidden_sizes=(64, 128), depths=(1, 1), random_batchnorm=True)


def logits(model, x=X):
    with torch.no_grad():
        return model(**x).logits


def aligned(widths: dict, sizes: dict, multiple: int) -> bool:
    return all(w % multiple == 0 or w == sizes[name] for name, w in widths.items())


# ------------------------------------------------------------------------------------------------- the rules
def test_auto_picks_8_on_cuda_the_measured_multiple_on_cpu_and_1_elsewhere():
    assert aligned_multiple("cuda") == aligned_multiple("cuda:1") == aligned_multiple(torch.device("cuda", 0)) == 8
    assert aligned_multiple("cpu") == CPU_MULTIPLE
    assert aligned_multiple("meta") == 1
    model = wide_resnet()
    assert width_multiple("auto", model) == (CPU_MULTIPLE if CPU_MULTIPLE > 1 else None)  # the model's device
    assert width_multiple("auto", model, device="cuda") == 8
    assert width_multiple(16, model, device="cuda") == 16  # an int is taken as given
    assert width_multiple(1) is None and width_multiple(None) is None


@pytest.mark.parametrize("bad", ["8", "cuda", 0, -8, 2.0, True])
def test_bad_round_to_is_a_clear_error_everywhere(bad):
    model = wide_resnet()
    with pytest.raises(ValueError, match="round_to must be a positive int, 'auto' or None"):
        width_multiple(bad, model)
    with pytest.raises(ValueError, match="round_to"):
        widths_for_flops(model, X, 0.5, round_to=bad)
    for config in (CSGDConfig, ResRepConfig):
        with pytest.raises(ValueError, match="round_to"):
            config(round_to=bad)
    with pytest.raises(ValueError, match="not a torch device"):
        aligned_multiple("gpu")


@pytest.mark.parametrize("groups,target", [("all", 0.45), ("all", 0.6), ("internal", 0.92)])
def test_rounded_widths_keep_the_flops_budget(groups, target):
    """Rounding happens inside the width search: the rounded widths still fit the target, measured on the slimmed
    model, and cost no more than the unrounded ones save (the ratio is lowered instead)."""
    model = wide_resnet()
    found = find_channel_groups(model)
    sizes = {g.name: g.size for g in found}
    flops = FlopsModel.measure(model, X, found)
    free = widths_for_flops(model, X, target, groups=groups)
    for device in ("cuda", "cpu"):
        widths = widths_for_flops(model, X, target, groups=groups, round_to="auto", device=device)
        multiple = aligned_multiple(device)
        assert aligned(widths, sizes, multiple)
        slim = apply_plan(wide_resnet(), plan_from_widths(model, found, widths, round_to="auto", device=device))
        assert count_flops(slim, X) == flops.flops(widths) <= target * flops.baseline
        assert flops.flops(free) <= target * flops.baseline
    assert plan_from_widths(model, found, widths, round_to="auto", device="cuda").round_to == 8


def test_plan_rounds_widths_up_and_records_the_resolved_multiple():
    model = wide_resnet()
    found = find_channel_groups(model)
    plan = plan_from_widths(model, found, {"stage1": 20, "stage0": 3}, round_to="auto", device="cuda")
    assert plan.widths == {"stage1": 24, "stage0": 8} and plan.round_to == 8
    assert plan_from_widths(model, found, {"stage1": 20}, round_to=16).widths == {"stage1": 32}


# ------------------------------------------------------------------------------------------------- lossless
def test_csgd_trim_with_auto_widths_is_lossless():
    model = wide_resnet()
    cb = CentripetalSGDCallback(keep_ratio=0.4, round_to="auto")
    cb.prepare(model)
    sizes = {g.name: g.size for g in find_channel_groups(model)}
    project_onto_cluster_means(cb)
    before = logits(model)
    plan = cb.slim(model, inputs=X)
    assert cb.multiple == width_multiple("auto", model) and plan.round_to == cb.multiple
    assert aligned(plan.widths, sizes, cb.multiple or 1)
    assert any(w < sizes[n] for n, w in plan.widths.items())
    assert_fp32_close(logits(model), before)


def test_csgd_auto_on_cuda_widths(monkeypatch):
    """A model on CUDA gets multiples of 8 (the device is read from the parameters, faked here)."""
    import peft_effadapt.pruning.flops as flops

    monkeypatch.setattr(flops, "CPU_MULTIPLE", 8)  # the CPU stands in for CUDA: same resolution path
    model = wide_resnet()
    cb = CentripetalSGDCallback(keep_ratio=0.4, round_to="auto")
    cb.prepare(model)
    project_onto_cluster_means(cb)
    before = logits(model)
    plan = cb.slim(model, inputs=X)
    assert plan.round_to == 8 and all(w % 8 == 0 for w in plan.widths.values())
    assert_fp32_close(logits(model), before)


def test_resrep_conversion_with_auto_widths_is_lossless():
    """Masked rows are zero; rounding up keeps some of them (largest norms first), which stays exact."""
    model = wide_resnet()
    cb = ResRepCallback(flops_target=0.5, groups="streams", round_to=16, mask_interval=1, warmup_steps=0)
    cb.prepare(model, X)
    perturb_and_zero_rows(cb, rows=range(0, 32, 2))  # 16 of every stream (32, 64 and 128 channels)
    before = logits(model)
    plan = cb.slim()
    sizes = {g.name: g.size for g in find_channel_groups(wide_resnet())}
    assert plan.round_to == 16 and aligned(plan.widths, sizes, 16)
    assert any(w < sizes[n] for n, w in plan.widths.items())
    assert_fp32_close(logits(model), before)


def test_resrep_auto_resolves_on_the_model_device():
    model = wide_resnet()
    cb = ResRepCallback(flops_target=0.5, groups="all", round_to="auto")
    cb.prepare(model, X)
    assert cb.multiple == width_multiple("auto", model)
    assert cb.config.round_to == "auto"  # the config keeps the request; JSON state round-trips
    assert ResRepCallback(**cb.state()["args"]).config == cb.config


# ------------------------------------------------------------------------------------------------- load_slimmed
@pytest.fixture
def saved(tmp_path):
    model = wide_resnet()
    found = find_channel_groups(model)
    plan = plan_from_widths(model, found, widths_for_flops(model, X, 0.5, round_to=8), round_to=8)
    apply_plan(model, plan)
    save_slimmed(model, plan, tmp_path)
    return tmp_path, logits(model)


def test_load_slimmed_defaults_on_cpu_keep_the_saved_layout_and_dtype(saved):
    path, expected = saved
    model = load_slimmed(path)
    conv = model.resnet.embedder.embedder.convolution.weight
    assert conv.is_contiguous() and conv.dtype == torch.float32 and conv.device.type == "cpu"
    assert not model.training
    assert torch.equal(logits(model), expected)


def test_load_slimmed_channels_last_and_dtype(saved):
    path, expected = saved
    model = load_slimmed(path, channels_last=True)
    convs = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert_fp32_close(logits(model), expected)  # another conv kernel: same values up to summation order
    save_slimmed(model, None, path / "again")  # a channels_last model saves as a standard one
    assert torch.equal(logits(load_slimmed(path / "again")), logits(load_slimmed(path)))
    half = load_slimmed(path, dtype="bfloat16", device="cpu", channels_last=False)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert load_slimmed(path, dtype=torch.float64).resnet.embedder.embedder.convolution.weight.dtype == torch.float64


def test_load_slimmed_channels_last_by_default_on_cuda_for_conv_nets(saved, monkeypatch):
    """The automatic choice is taken for the requested device; `.to` is faked so the CUDA branch runs on CPU."""
    path, _ = saved
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    moved = []

    def fake_to(self, *args, **kwargs):
        moved.append((args, kwargs))
        if "memory_format" in kwargs:
            return original_to(self, memory_format=kwargs["memory_format"])
        return self

    original_to = nn.Module.to
    monkeypatch.setattr(nn.Module, "to", fake_to)
    model = load_slimmed(path, device="cuda")
    assert [kw["device"] for _, kw in moved if "device" in kw] == [torch.device("cuda")]
    assert moved[-1][1] == {"memory_format": torch.channels_last}
    assert model.resnet.embedder.embedder.convolution.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("kwargs,match", [
    (dict(device="gpu"), "device='gpu' is not a torch device"),
    (dict(device=3.5), "is not a torch device"),
    (dict(dtype="int8"), "dtype='int8' is not one of"),
    (dict(dtype=torch.int64), "must be a floating torch.dtype"),
    (dict(dtype=8), "must be a floating torch.dtype"),
    (dict(channels_last="yes"), "channels_last must be True, False or None"),
])
def test_load_slimmed_bad_placement_is_refused_before_reading(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_slimmed(tmp_path / "does-not-exist", **kwargs)  # checked before the folder or the Hub is touched


def test_load_slimmed_cuda_without_cuda_is_refused(saved, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        load_slimmed(saved[0], device="cuda")


def test_aligned_slimming_stays_exact_in_channels_last():
    """An aligned C-SGD trim, then the GPU layout (channels_last): still the unslimmed model's function."""
    model = wide_resnet()
    cb = CentripetalSGDCallback(keep_ratio=0.5, round_to=8)
    cb.prepare(model)
    project_onto_cluster_means(cb)
    before = logits(model)
    cb.slim(model, inputs=X)
    model.to(memory_format=torch.channels_last)
    assert_fp32_close(logits(model, {"pixel_values": X["pixel_values"].contiguous(memory_format=torch.channels_last)}),
                      before)
