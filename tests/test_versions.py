"""The declared version range: transformers' own adapter methods work where transformers allows them with the
installed peft, and raise a clear error naming both versions where it does not (transformers >= 5.24)."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
import torch
import transformers
from packaging.requirements import Requirement
from packaging.version import Version

from peft_effadapt import ConsolidatorConfig
from peft_effadapt.compat import TransformersAdapterRouteError, transformers_adapter_methods_gated
from peft_effadapt.testing import tiny_vit

GATED = transformers_adapter_methods_gated()


def logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(pixel_values=x).logits


def test_installed_versions_are_in_the_declared_range():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    declared = {Requirement(r).name.lower(): Requirement(r) for r in project["dependencies"]}
    for name in ("transformers", "peft"):
        installed = Version(importlib.metadata.version(name))
        assert declared[name].specifier.contains(installed, prereleases=True), (name, installed, declared[name])


def test_gate_is_what_transformers_declares():
    from transformers.integrations import peft as integration

    needed = getattr(integration, "MIN_PEFT_VERSION", None)
    assert (needed is not None and Version(importlib.metadata.version("peft")) < Version(needed)) == GATED
    assert (Version(transformers.__version__) >= Version("5.24")) == GATED  # with peft 0.21.x, the declared range


@pytest.mark.skipif(not GATED, reason="this transformers runs its adapter methods with the installed peft")
def test_gated_adapter_methods_raise_a_clear_error_and_leave_the_model():
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TransformersAdapterRouteError, match=r"peft >= 0\.2\d.*peft 0\.21\.x.*PeftModel\.from_pretrained"):
        model.add_adapter(ConsolidatorConfig(fc_groups=[8]))
    with pytest.raises(ValueError, match=rf"transformers {transformers.__version__} runs its own adapter methods"):
        model.disable_adapters()
    assert set(model.state_dict()) == set(before)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    torch.testing.assert_close(logits(model, x), logits(tiny_vit(), x), rtol=0, atol=0)  # same weights, same ops


@pytest.mark.skipif(GATED, reason="transformers >= 5.24 gates these methods at peft >= 0.22 (tested above)")
def test_transformers_adapter_methods_work_where_allowed():
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    reference = logits(tiny_vit(), x)
    model.add_adapter(ConsolidatorConfig(fc_groups=[8], init_weights=False))
    assert model.active_adapters() == ["default"]
    adapted = logits(model, x)
    assert not torch.allclose(adapted, reference, atol=1e-4)
    model.disable_adapters()
    torch.testing.assert_close(logits(model, x), reference, rtol=0, atol=0)  # the base path alone: identical ops
    model.enable_adapters()
    torch.testing.assert_close(logits(model, x), adapted, rtol=0, atol=0)
    assert any(".consolidator_branches." in k for k in model.get_adapter_state_dict())  # what save_pretrained writes
    model.delete_adapter("default")
