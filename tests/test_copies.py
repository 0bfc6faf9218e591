"""`copy.deepcopy` gives an independent model for every conformance case (one adapter, several adapters, merged):
the copy called before the original computes the original's outputs, and changing either model's tensors afterwards
leaves the other one's outputs unchanged. Hooks that close over the original's modules fail the first check (they read
the state the original's last forward left behind, or none) and the second (they read the original's prompts)."""

from __future__ import annotations

import copy
import functools
import types

import pytest
import torch
from peft import get_peft_model

from peft_effadapt import testing
from peft_effadapt.pruning import ResRepCallback

from fp32 import assert_fp32_close
from method_cases import CASES

SCENARIOS = ("one-adapter", "two-adapters", "merged")
PARAMS = [pytest.param(case, scenario, id=f"{case.id}-{scenario}") for case in CASES for scenario in SCENARIOS
          if scenario != "merged" or case.mergeable]


def build(case, scenario):
    """The adapted (or merged) model with visibly non-identity adapters; two calls give identical models."""
    torch.manual_seed(0)
    model = get_peft_model(case.make_model(), case.make_config(init_weights=False))
    if scenario == "two-adapters":
        torch.manual_seed(1)
        model.add_adapter("other", case.make_config(init_weights=False))
        model.set_adapter("other")
    if scenario == "merged":
        model = model.merge_and_unload()
    return model.eval()


def run(case, model, inputs):
    with torch.no_grad():
        return case.output(model(**inputs))


def perturb(model):
    """Adds noise in place to the tensors a user would train: the active adapter's (every float parameter of a merged
    model, which has none)."""
    params = [p for p in model.parameters() if p.requires_grad] or [
        p for p in model.parameters() if p.is_floating_point()]
    with torch.no_grad():
        for param in params:
            param.add_(torch.randn_like(param) * 0.5)


HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
FUNCTIONS = (types.FunctionType, types.MethodType, types.BuiltinFunctionType, functools.partial)


def assert_hooks_are_objects(model):
    """The package's convention: every hook is a callable object bound to module state (a function or bound method
    would be shared, not copied, by `copy.deepcopy`), and no module has a `forward` of its own instance."""
    for name, module in model.named_modules():
        assert "forward" not in vars(module), f"{name or 'the model'} has an instance-bound forward"
        for kind in HOOK_DICTS:
            for hook in getattr(module, kind).values():
                assert not isinstance(hook, FUNCTIONS), f"{kind} of {name or 'the model'}: {hook!r} is a function"


def assert_independent(case, model, twin, reference, inputs):
    """`twin` (a deep copy of `model`, not yet called) against `reference` (an identically built model)."""
    expected = run(case, reference, inputs)
    assert_fp32_close(run(case, twin, inputs), expected, msg="the copy, called first")
    original = run(case, model, inputs)
    assert_fp32_close(original, expected, msg="the original, called after its copy")
    perturb(twin)
    moved = run(case, twin, inputs)
    assert not torch.allclose(moved, original), "perturbing the copy changed nothing: the check has no teeth"
    torch.testing.assert_close(run(case, model, inputs), original, rtol=0, atol=0, msg="original after copy changed")
    perturb(model)
    assert not torch.allclose(run(case, model, inputs), original)
    torch.testing.assert_close(run(case, twin, inputs), moved, rtol=0, atol=0, msg="copy after original changed")
    assert_hooks_are_objects(model)


@pytest.mark.parametrize(("case", "scenario"), PARAMS)
def test_deepcopy_is_independent(case, scenario):
    inputs = case.make_inputs()
    model, reference = build(case, scenario), build(case, scenario)
    assert_independent(case, model, copy.deepcopy(model), reference, inputs)
    if scenario != "merged":  # unloading the copy removes its own hooks, not the original's
        adapted = run(case, model, inputs)
        copy.deepcopy(model).unload()
        torch.testing.assert_close(run(case, model, inputs), adapted, rtol=0, atol=0)


def test_deepcopy_of_a_resrep_model_mid_training_is_independent():
    """Compactors attached by the callback (shared ones on the residual streams included), trained away from the
    identity: the copy holds its own compactors and its hooks apply them."""

    def prepared():
        model = testing.tiny_resnet("basic", depths=(1, 1), hidden_sizes=(16, 32), random_batchnorm=True)
        callback = ResRepCallback(flops_target=0.9, groups="all")
        callback.prepare(model, {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))})
        torch.manual_seed(2)
        with torch.no_grad():
            for compactor in callback.compactors.values():
                compactor.weight.add_(0.2 * torch.randn_like(compactor.weight))
        return model.eval(), callback

    (model, callback), (reference, _) = prepared(), prepared()
    assert any(len(group.producers) > 1 for group in callback.targets), "no shared (residual) compactor in the case"
    case = type("Case", (), {"output": staticmethod(lambda out: out.logits)})
    inputs = {"pixel_values": torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))}
    assert_independent(case, model, copy.deepcopy(model), reference, inputs)
