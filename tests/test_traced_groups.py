"""Channel groups found by tracing (`pruning/tracing.py`): the same groups as the hand-written HF ResNet rules, the
expected structure on HF ConvNeXt / RegNet (X, Y) / MobileNetV2 with refused groups and their reasons, exact slimming
by C-SGD and ResRep through their public APIs, FLOPs against torch's counter, and fresh-process reloads."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_csgd import project_onto_cluster_means
from test_resrep import perturb_and_zero_rows
from torch import nn

from peft_effadapt.pruning import (
    CentripetalSGDCallback,
    FlopsModel,
    ResRepCallback,
    count_flops,
    find_channel_groups,
    load_slimmed,
    save_slimmed,
    widths_for_flops,
)
from peft_effadapt.pruning.groups import _resnet_groups, select_groups
from peft_effadapt.pruning.tracing import trace_channel_groups
from peft_effadapt.testing import tiny_cnn, tiny_resnet

from fp32 import assert_fp32_close

REPO = Path(__file__).resolve().parents[1]
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def logits(model, x=X):
    with torch.no_grad():
        return model(x).logits


def by_producers(groups):
    return {tuple(p for p, _ in g.producers): g for g in groups}


def same_as_rules(model):
    rules, traced = by_producers(_resnet_groups(model)), by_producers(trace_channel_groups(model))
    assert rules.keys() == traced.keys()
    for key, rule in rules.items():
        got = traced[key]
        assert (got.producers, got.norms, got.size, got.residual, got.reaches_output) == \
            (rule.producers, rule.norms, rule.size, rule.residual, rule.reaches_output), rule.name
        assert sorted(got.consumers) == sorted(rule.consumers), rule.name  # order of readers carries no meaning
        assert got.prunable == rule.prunable and (rule.meta.get("role") == "stem") == (got.meta["role"] == "stem")
    return len(rules)


# ------------------------------------------------------------------------------------------------ discovery
@pytest.mark.parametrize("layer_type", ["bottleneck", "basic"])
def test_tracing_finds_the_hand_written_resnet_groups(layer_type):
    assert same_as_rules(tiny_resnet(layer_type)) == (9 if layer_type == "bottleneck" else 6)
    headless = tiny_resnet(layer_type, depths=(2, 2)).resnet  # the last stream reaches the output
    assert same_as_rules(headless) == (11 if layer_type == "bottleneck" else 7)


def test_tracing_finds_the_37_groups_of_a_resnet50_shaped_model():
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    assert same_as_rules(ResNetForImageClassification(ResNetConfig()).eval()) == 37  # defaults: ResNet-50


def test_convnext_pointwise_groups_are_prunable_and_layernorm_streams_refused():
    model = tiny_cnn("convnext")
    groups = find_channel_groups(model)
    internal = [g for g in groups if g.prunable]
    assert [g.name for g in internal] == [f"convnext.encoder.stages.{s}.layers.{i}.pwconv1" for s, i in
                                          ((0, 0), (0, 1), (1, 0))]
    for g in internal:
        assert g.producers == [(g.name, "linear")] and g.consumers == [g.name.replace("pwconv1", "pwconv2")]
        assert g.size == 4 * model.get_submodule(g.name).in_features and g.internal and not g.norms
    streams = [g for g in groups if not g.prunable]
    assert len(streams) == 2 and all(g.residual for g in streams)
    stem = streams[0]
    assert stem.producers[0] == ("convnext.embeddings.patch_embeddings", "conv") and stem.meta["role"] == "stem"
    assert ("convnext.encoder.stages.0.layers.1.dwconv", "depthwise") in stem.producers
    assert "LayerNorm over channels at convnext.embeddings.layernorm" in stem.meta["unprunable"]
    assert stem.channel_params == [f"convnext.encoder.stages.0.layers.{i}.layer_scale_parameter" for i in (0, 1)]
    assert "LayerNorm over channels at convnext.encoder.stages.1.downsampling_layer.0" in stem.meta["unprunable"]
    with pytest.raises(ValueError, match="LayerNorm over channels at convnext.embeddings.layernorm"):
        select_groups(groups, [stem.name])
    headless = find_channel_groups(tiny_cnn("convnext", with_head=False))
    (output,) = [g for g in headless if g.reaches_output]  # last_hidden_state / pooler output
    assert output.residual and output.producers[0][0] == "encoder.stages.1.downsampling_layer.1"


@pytest.mark.parametrize("layer_type", ["x", "y"])
def test_regnet_streams_and_se_groups_are_prunable_grouped_convs_refused(layer_type):
    model = tiny_cnn(f"regnet-{layer_type}")
    groups = find_channel_groups(model)
    prunable = {g.name: g for g in groups if g.prunable}
    streams = [g for g in prunable.values() if g.residual]
    assert [len(g.producers) for g in streams] == [2, 3]  # projection + last conv of each block
    assert prunable["regnet.embedder.embedder.convolution"].meta["role"] == "stem"
    se = [g for g in prunable.values() if not g.residual and g.meta["role"] == "block"]
    assert len(se) == (3 if layer_type == "y" else 0)
    for g in se:  # SE reduce conv -> SE expand conv
        assert g.name.endswith("attention.0") and g.consumers == [g.name[:-1] + "2"]
    refused = [g for g in groups if not g.prunable]
    assert len(refused) == 6 and all("grouped conv at" in g.meta["unprunable"] for g in refused)
    coupled = [g for g in refused if len(g.producers) > 1]
    assert len(coupled) == (3 if layer_type == "y" else 0)
    for g in coupled:  # the SE expand conv's output is multiplied into the block tensor: one group
        assert g.meta["coupled_by"] == "mul" and g.producers[1][0].endswith("attention.2")
        assert any(c.endswith("attention.0") for c in g.consumers)


def test_mobilenet_v2_inverted_residual_groups_and_streams():
    model = tiny_cnn("mobilenet_v2")
    groups = find_channel_groups(model)
    assert all(g.prunable for g in groups) and len(groups) == 25
    blocks = [g for g in groups if g.producers[-1][1] == "depthwise"]
    assert len(blocks) == 17  # the stem's first conv and the 16 expand convs, each with its depthwise conv
    for g in blocks[1:]:
        base = g.name.rsplit(".", 2)[0]
        assert g.producers == [(f"{base}.expand_1x1.convolution", "conv"), (f"{base}.conv_3x3.convolution", "depthwise")]
        assert g.norms == [f"{base}.expand_1x1.normalization", f"{base}.conv_3x3.normalization"]
        assert g.consumers == [f"{base}.reduce_1x1.convolution"]
    streams = [g for g in groups if g.residual]
    assert [len(g.producers) for g in streams] == [2, 3, 4, 3, 3]
    assert len(streams[2].consumers) == 4 and not any(g.reaches_output for g in groups)
    with pytest.raises(ValueError, match="depthwise conv cannot absorb the compactor"):
        ResRepCallback(flops_target=0.5, groups="all").prepare(model, X)


# ------------------------------------------------------------------------------------------------ slimming
FAMILIES = ["convnext", "regnet-x", "regnet-y", "mobilenet_v2"]
# ResRep folds a compactor into each producer, so it takes no group with a depthwise rider (MobileNetV2's blocks)
RESREP_GROUPS = {"convnext": "internal", "regnet-x": "all", "regnet-y": "all",
                 "mobilenet_v2": ["*reduce_1x1*", "*conv_1x1*"]}


def _csgd(family, directory):
    model = tiny_cnn(family)
    flops = FlopsModel.measure(model, X, find_channel_groups(model))
    cb = CentripetalSGDCallback(keep_ratio=0.5, cluster_method="even")
    cb.prepare(model)
    project_onto_cluster_means(cb)  # stands in for converged training
    wide = logits(model)
    plan = cb.slim(model, inputs=X)
    assert_fp32_close(logits(model), wide)
    assert count_flops(model, X) == flops.flops(plan.widths) < flops.baseline  # FlopCounterMode vs prediction
    save_slimmed(model, None, directory)
    return model


def _resrep(family, directory):
    model = tiny_cnn(family)
    cb = ResRepCallback(flops_target=0.95, groups=RESREP_GROUPS[family], drop_masked_rows=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="ResRep compactor on")  # ConvNeXt's small pointwise layers
        cb.prepare(model, X)
    perturb_and_zero_rows(cb, rows=(0,))
    before = logits(model)
    plan = cb.slim()
    assert all(gp.width == gp.group.size - 1 for gp in plan.groups)
    assert_fp32_close(logits(model), before)
    assert cb.final_flops_ratio == count_flops(model, X) / cb.flops.baseline
    save_slimmed(model, None, directory)
    return model


@pytest.fixture(scope="module")
def slimmed(tmp_path_factory):
    """{(family, method): (slimmed model, its save folder)}, built on first use (each build asserts exactness)."""
    root, built = tmp_path_factory.mktemp("traced"), {}

    def get(family, method):
        if (family, method) not in built:
            folder = root / f"{family}-{method}"
            built[family, method] = ({"csgd": _csgd, "resrep": _resrep}[method](family, folder), folder)
        return built[family, method]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_csgd_and_resrep_slim_exactly_and_reload(slimmed, family):
    for method in ("csgd", "resrep"):
        model, folder = slimmed(family, method)
        assert torch.equal(logits(load_slimmed(folder)), logits(model))


def test_slimmed_families_reload_in_a_fresh_process(slimmed, tmp_path):
    folders = {f"{family}-{method}": slimmed(family, method) for family in FAMILIES for method in ("csgd", "resrep")}
    save_file({"x": X}, str(tmp_path / "x.safetensors"))
    code = (f"import torch\nfrom safetensors.torch import load_file, save_file\n"
            f"from peft_effadapt.pruning import load_slimmed\nx = load_file({str(tmp_path / 'x.safetensors')!r})['x']\n"
            f"with torch.no_grad():\n    y = {{k: load_slimmed(v)(x).logits.contiguous() for k, v in "
            f"{ {k: str(v[1]) for k, v in folders.items()}!r}.items()}}\n"
            f"save_file(y, {str(tmp_path / 'y.safetensors')!r})\n")
    subprocess.run([sys.executable, "-c", code], check=True,  # same thread count: same kernels, bit-identical
                   env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(torch.get_num_threads())})
    reloaded = load_file(str(tmp_path / "y.safetensors"))
    for name, (model, _) in folders.items():
        assert torch.equal(reloaded[name], logits(model)), name


def test_widths_for_flops_reaches_half_the_flops_on_traced_groups():
    model = tiny_cnn("mobilenet_v2")
    widths = widths_for_flops(model, X, 0.5)
    flops = FlopsModel.measure(model, X, find_channel_groups(model, X))
    assert 0.4 < flops.ratio(widths) <= 0.5


# ------------------------------------------------------------------------------------------------ custom models
class LayerScaled(nn.Module):
    """conv -> BN -> ReLU -> per-channel scale -> conv: the scale is sliced with its group."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.gamma = nn.Parameter(torch.randn(8))
        self.conv2 = nn.Conv2d(8, 4, 3)

    def forward(self, x):
        return self.conv2(self.gamma[:, None, None] * torch.relu(self.bn(self.conv1(x))))


def test_layer_scale_is_sliced_with_its_group_by_both_methods():
    model = LayerScaled().eval()
    (group,) = find_channel_groups(model, X)
    assert group.channel_params == ["gamma"] and group.norms == ["bn"] and group.consumers == ["conv2"]
    cb = CentripetalSGDCallback(keep_ratio=0.5, cluster_method="even")
    cb.prepare(model)
    assert "gamma" in [t.name for e in cb._entries for t in e.tensors]  # pulled to the cluster centres too
    project_onto_cluster_means(cb)
    before = model(X)
    cb.slim(model, inputs=X)
    assert model.gamma.shape == (4,) and model.conv2.in_channels == 4
    assert_fp32_close(model(X), before)
    model = LayerScaled().eval()
    cb = ResRepCallback(flops_target=0.95, groups="all", drop_masked_rows=True)  # conv1 reads the input: "stem"
    cb.prepare(model, X)
    perturb_and_zero_rows(cb, rows=(2,))
    before = model(X)
    cb.slim()
    assert model.gamma.shape == (7,)
    assert_fp32_close(model(X), before)


class CumsumOverChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU())
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(self.body(x).cumsum(1))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(x) if x.sum() > 0 else self.conv(-x)


def test_unknown_ops_and_untraceable_models_give_clear_errors():
    with pytest.raises(ValueError, match=r"aten\.cumsum\.default at module '<top level>'"):
        find_channel_groups(CumsumOverChannels(), X)
    with pytest.raises(ValueError, match="Cannot trace DataDependent with torch.export"):
        find_channel_groups(DataDependent(), X)
    with pytest.raises(ValueError, match="No prunable channel groups"):
        find_channel_groups(nn.Sequential(nn.Conv2d(3, 4, 1)))
