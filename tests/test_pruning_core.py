"""Coupled-channel groups, slimming surgery, plans (save / fresh-process reload) and the FLOPs model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import ResNetConfig, ResNetModel

from peft_effadapt import testing
from peft_effadapt.pruning import (
    PLAN_NAME,
    FlopsModel,
    GroupPlan,
    SlimmingPlan,
    apply_plan,
    count_flops,
    find_channel_groups,
    load_slimmed,
    plan_from_widths,
    round_to,
    save_slimmed,
)
from peft_effadapt.testing import randomize_batchnorm, tiny_clip_vision, tiny_vit

from fp32 import assert_fp32_close

tiny_resnet = partial(testing.tiny_resnet, random_batchnorm=True)  # BN statistics that make mistakes visible


def small_cnn():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 6 * 6, 4))
    randomize_batchnorm(net)
    return net.eval()


PIXELS = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def logits(model, x=PIXELS):
    with torch.no_grad():
        out = model(pixel_values=x) if not isinstance(model, nn.Sequential) else model(x)
    return getattr(out, "logits", out)


# ------------------------------------------------------------------------------------------------- groups
def test_resnet_bottleneck_groups_cover_internal_and_residual_streams():
    model = tiny_resnet()
    groups = {g.name: g for g in find_channel_groups(model)}
    assert [n for n, g in groups.items() if g.residual] == ["stage0", "stage1"]
    s0 = groups["stage0"]
    assert s0.producers[0] == ("resnet.encoder.stages.0.layers.0.shortcut.convolution", "conv")  # pacesetter
    assert [p for p, _ in s0.producers[1:]] == [f"resnet.encoder.stages.0.layers.{i}.layer.2.convolution"
                                                for i in range(2)]
    assert s0.consumers == ["resnet.encoder.stages.0.layers.1.layer.0.convolution",
                            "resnet.encoder.stages.1.layers.0.shortcut.convolution",
                            "resnet.encoder.stages.1.layers.0.layer.0.convolution"]
    assert groups["stage1"].consumers == ["classifier.1"]
    internal = [g for g in groups.values() if g.internal and g.meta["role"] == "block"]
    assert len(internal) == 6 and all(g.size in (4, 8) for g in internal)
    assert groups["stem"].consumers[0].endswith("shortcut.convolution")


def test_basic_resnet_without_projection_makes_the_stem_the_pacesetter():
    groups = {g.name: g for g in find_channel_groups(tiny_resnet("basic", embedding_size=16))}
    assert "stem" not in groups
    assert groups["stage0"].pacesetter == "resnet.embedder.embedder.convolution"
    assert groups["stage0"].consumers[0] == "resnet.encoder.stages.0.layers.0.layer.0.convolution"


def test_headless_resnet_marks_its_output_stream_unprunable():
    model = ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[16, 32], depths=[1, 1]))
    last = find_channel_groups(model)[-1]
    assert last.reaches_output and not last.prunable
    plan = SlimmingPlan([GroupPlan(last, [0, 1])])
    with pytest.raises(ValueError, match="output"):
        apply_plan(model, plan)


def test_mlp_groups_for_vit_and_clip():
    for model, prefix in ((tiny_vit(num_labels=3), "vit.layers.0.mlp"), (tiny_clip_vision(), "encoder.layers.0.mlp")):
        group = find_channel_groups(model)[0]
        assert group.producers == [(f"{prefix}.fc1", "linear")] and group.consumers == [f"{prefix}.fc2"]
        assert group.size == 64 and group.internal


def test_nothing_to_prune_is_a_clear_error():
    with pytest.raises(ValueError, match="No prunable channel groups"):
        find_channel_groups(nn.Sequential(nn.Linear(4, 3)))


# ------------------------------------------------------------------------------------------------- surgery
@pytest.mark.parametrize("layer_type,embedding_size", [("bottleneck", 8), ("basic", 16), ("basic", 8)])
def test_cluster_trim_is_exact_and_residual_groups_stay_consistent(layer_type, embedding_size):
    """Members of each cluster made identical (kernels, BN parameters and statistics) in every producer of a group,
    as C-SGD leaves them: keeping one and summing the consumers' input slices preserves the logits."""
    model = tiny_resnet(layer_type, embedding_size=embedding_size)
    groups = find_channel_groups(model)
    plans = []
    with torch.no_grad():
        for group in groups:
            clusters = [list(range(i, min(i + 2, group.size))) for i in range(0, group.size, 2)]
            for path, _ in group.producers:
                weight = model.get_submodule(path).weight
                for members in clusters:
                    weight[members] = weight[members[0]].clone()
            for path in group.norms:
                bn = model.get_submodule(path)
                for tensor in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
                    for members in clusters:
                        tensor[members] = tensor[members[0]].clone()
            plans.append(GroupPlan(group, [c[0] for c in clusters], clusters))
    plan = SlimmingPlan(plans, method="test")
    flops = FlopsModel.measure(model, {"pixel_values": PIXELS}, groups)
    before = logits(model)
    apply_plan(model, plan)
    assert_fp32_close(logits(model), before)
    assert flops.flops(plan.widths) == count_flops(model, {"pixel_values": PIXELS})
    for group in groups:  # residual consistency: every producer / norm / consumer agrees on the new width
        width = plan[group.name].width
        for path, _ in group.producers:
            assert model.get_submodule(path).out_channels == width
        assert all(model.get_submodule(p).num_features == width for p in group.norms)
        for path in group.consumers:
            module = model.get_submodule(path)
            assert (module.in_features if isinstance(module, nn.Linear) else module.in_channels) == width


def test_plain_cnn_with_depthwise_and_flatten_linear():
    net = small_cnn()
    x = torch.randn(2, 3, 8, 8)
    groups = find_channel_groups(net)
    assert groups[0].producers == [("0", "conv"), ("3", "depthwise")] and groups[0].norms == ["1", "4"]
    assert groups[1].consumers == ["9"]
    flops = FlopsModel.measure(net, x, groups)
    plan = plan_from_widths(net, groups, {"0": 5, "6": 3})
    reference = net[9].weight.detach().reshape(4, 6, 36)[:, plan["6"].keep].reshape(4, -1).clone()
    apply_plan(net, plan)
    assert net[3].groups == net[3].in_channels == net[3].out_channels == 5 and net[4].num_features == 5
    assert net[9].in_features == 3 * 36 and torch.equal(net[9].weight.detach(), reference)  # NCHW flatten blocks
    assert flops.flops(plan.widths) == count_flops(net, x)
    assert net(x).shape == (2, 4)


def test_mlp_slimming_flops_match_and_config_is_unchanged():
    model = tiny_vit(num_labels=3).eval()
    groups = find_channel_groups(model)
    inputs = {"pixel_values": PIXELS}
    flops = FlopsModel.measure(model, inputs, groups)
    plan = plan_from_widths(model, groups, {g.name: 24 for g in groups})
    apply_plan(model, plan)
    fc1 = model.vit.layers[0].mlp.fc1
    assert fc1.out_features == 24 and fc1.weight.shape == (24, 32) and model.vit.layers[0].mlp.fc2.in_features == 24
    assert model.config.intermediate_size == 64  # per-layer widths live in the plan
    assert flops.flops(plan.widths) == count_flops(model, inputs)


def test_bad_plan_leaves_the_model_untouched():
    model = tiny_resnet()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    groups = find_channel_groups(model)
    good = GroupPlan(groups[0], [0, 1])
    wrong_size = GroupPlan(groups[1].__class__(**{**groups[1].__dict__, "size": 7}), [0, 1])
    with pytest.raises(ValueError, match="output channels"):
        apply_plan(model, SlimmingPlan([good, wrong_size]))
    for bad, match in (([0, 0], "distinct"), ([99], "distinct"), ([], "no channel")):
        with pytest.raises(ValueError, match=match):
            apply_plan(model, SlimmingPlan([good, GroupPlan(groups[1], bad)]))
    with pytest.raises(ValueError, match="not in its cluster"):
        apply_plan(model, SlimmingPlan([GroupPlan(groups[1], [0], [[1, 2]])]))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert model.resnet.embedder.embedder.convolution.out_channels == 8


def test_round_to_helper_and_plan():
    assert [round_to(w, 16, 64) for w in (1, 16, 17, 60, 64)] == [16, 16, 32, 64, 64]
    assert round_to(5, None) == 5 and round_to(5, 8, 6) == 6
    model = tiny_resnet()
    groups = find_channel_groups(model)
    plan = plan_from_widths(model, groups, {"stage1": 10}, round_to=8)
    assert plan.widths == {"stage1": 16}
    with pytest.raises(ValueError, match="round_to"):
        SlimmingPlan([GroupPlan(groups[-1], list(range(10)))], round_to=8).validate()


def test_two_plans_compose_into_one():
    model, twin = tiny_resnet(), tiny_resnet()
    groups = find_channel_groups(model)
    first = plan_from_widths(model, groups, {"stage0": 12, "stage0.layer0.conv0": 3})
    apply_plan(model, first)
    second = plan_from_widths(model, find_channel_groups(model), {"stage0": 6})
    apply_plan(model, second)
    apply_plan(twin, first.then(second))
    torch.testing.assert_close(logits(twin), logits(model), atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------- save / load
RELOAD = """
import sys, torch
from safetensors.torch import save_file
from peft_effadapt.pruning import load_slimmed
torch.set_num_threads(1)
model = load_slimmed(sys.argv[1])
x = torch.load(sys.argv[2], weights_only=True)
with torch.no_grad():
    save_file({"logits": model(pixel_values=x).logits.contiguous()}, sys.argv[3])
"""


def test_save_and_fresh_process_reload_is_bit_identical(tmp_path):
    model = tiny_resnet()
    groups = find_channel_groups(model)
    plan = plan_from_widths(model, groups, {g.name: max(1, g.size // 2) for g in groups if g.prunable}, method="l1")
    apply_plan(model, plan)
    save_slimmed(model, plan, tmp_path / "slim")
    saved = json.loads((tmp_path / "slim" / PLAN_NAME).read_text())
    assert saved["format_version"] == 1 and saved["method"] == "l1"
    assert json.loads((tmp_path / "slim" / "config.json").read_text())["peft_effadapt_slimming"]["widths"] == \
        plan.widths
    torch.save(PIXELS, tmp_path / "x.pt")
    result = subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path / "slim"), str(tmp_path / "x.pt"),
                             str(tmp_path / "out.safetensors")], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})  # same kernels
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.equal(load_file(tmp_path / "out.safetensors")["logits"], logits(model))
    reloaded = load_slimmed(tmp_path / "slim")
    assert {k: v.shape for k, v in reloaded.state_dict().items()} == {k: v.shape for k, v in
                                                                       model.state_dict().items()}


def test_plain_model_reload_uses_a_factory(tmp_path):
    net = small_cnn()
    groups = find_channel_groups(net)
    plan = plan_from_widths(net, groups, {"0": 4})
    apply_plan(net, plan)
    save_slimmed(net, None, tmp_path)  # None: the plan recorded by apply_plan
    reloaded = load_slimmed(tmp_path, small_cnn)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(reloaded(x), net(x))
    with pytest.raises(ValueError, match="model_class"):
        load_slimmed(tmp_path)


def test_plan_that_does_not_match_the_weights_is_refused(tmp_path):
    model = tiny_resnet()
    groups = find_channel_groups(model)
    apply_plan(model, plan_from_widths(model, groups, {"stage0.layer0.conv0": 2}))
    save_slimmed(model, None, tmp_path)
    with pytest.raises(ValueError, match="ignore_mismatched_sizes"):
        load_slimmed(tmp_path, ignore_mismatched_sizes=True)
    data = json.loads((tmp_path / PLAN_NAME).read_text())
    data["groups"][0]["keep"] = [0, 1, 2]
    (tmp_path / PLAN_NAME).write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"does not match model.safetensors: .*stages\.0\.layers\.0\.layer\.0"):
        load_slimmed(tmp_path)
    data["groups"][0]["keep"] = [0, 1]
    (tmp_path / PLAN_NAME).write_text(json.dumps(data))
    weights = load_file(tmp_path / "model.safetensors")
    weights.pop("classifier.1.bias")
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="missing classifier.1.bias"):
        load_slimmed(tmp_path)


# ------------------------------------------------------------------------------------------------- shared Trainer core
@pytest.mark.parametrize("env", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
@pytest.mark.parametrize("value", ["1", "true"])
def test_both_callbacks_refuse_sharding_alike(monkeypatch, env, value):
    from peft_effadapt.pruning import CentripetalSGDCallback, ResRepCallback

    monkeypatch.setenv(env, value)
    for cb in (CentripetalSGDCallback(), ResRepCallback()):
        with pytest.raises(ValueError, match=f"{cb.method} edits whole output-channel rows.*{env}"):
            cb.on_train_begin(None, None, None, model=nn.Linear(2, 2))


def test_configs_are_validated_typed_and_round_trip():
    from peft_effadapt.pruning import CentripetalSGDCallback, CSGDConfig, ResRepCallback, ResRepConfig

    for bad, match in [(dict(groups="mlp"), "groups must be one of"), (dict(round_to=0), "round_to"),
                       (dict(equivalence_tol=-1.0), "equivalence_tol"), (dict(slim_on_train_end="yes"), "True or False")]:
        for cls in (CSGDConfig, ResRepConfig):
            with pytest.raises(ValueError, match=match):
                cls(**bad)
    with pytest.raises(ValueError, match="mask_interval"):
        ResRepConfig(mask_interval=0)
    with pytest.raises(TypeError, match="either a ResRepConfig or keyword options"):
        ResRepCallback(ResRepConfig(), flops_target=0.5)
    with pytest.raises(TypeError, match="must be a CSGDConfig"):
        CentripetalSGDCallback(ResRepConfig())
    cb = ResRepCallback(ResRepConfig(flops_target=0.5, round_to=8, groups="all", save_dir="out"))
    assert cb.flops_target == 0.5 and cb.round_to == 8 and cb.save_dir == "out"
    state = json.loads(json.dumps(cb.state()))
    assert ResRepCallback(**state["args"]).config == cb.config
    assert set(state["attributes"]) == {"mask_updates", "last_update_step", "target_reached_step",
                                        "masked_flops_ratio"}
