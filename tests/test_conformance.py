"""The conformance suite: peft's own API behaves for every registered method as it does for LoRA."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from fp32 import assert_fp32_close
from method_cases import CASES

HERE = Path(__file__).parent
ids = [case.id for case in CASES]
parametrize = pytest.mark.parametrize("case", CASES, ids=ids)


def run(case, model, inputs=None):
    model.eval()
    with torch.no_grad():
        return case.output(model(**(inputs or case.make_inputs())))


def train_one_step(case, model, lr=1e-2):
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    assert params, "the adapted model has no trainable parameters"
    optimizer = torch.optim.AdamW(params, lr=lr)
    case.train_loss(case.output(model(**case.make_inputs()))).backward()
    optimizer.step()
    optimizer.zero_grad()
    model.eval()


def saved_base(case, tmp_path):
    """A base model saved to disk and reloaded, so that adapter configs carry a loadable base_model_name_or_path."""
    model = case.make_model()
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir)
    cls = type(model)
    return cls.from_pretrained(base_dir).eval(), base_dir


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@parametrize
def test_step_changes_output_and_disable_restores_base(case):
    base_model = case.make_model()
    reference = run(case, base_model)
    model = get_peft_model(case.make_model(), case.make_config())
    train_one_step(case, model)
    adapted = run(case, model)
    assert not torch.allclose(adapted, reference, atol=1e-6)
    with model.disable_adapter():
        torch.testing.assert_close(run(case, model), reference, rtol=0, atol=0)
    torch.testing.assert_close(run(case, model), adapted, rtol=0, atol=0)


@parametrize
def test_only_adapter_parameters_train(case):
    model = get_peft_model(case.make_model(), case.make_config())
    trainable, total = model.get_nb_trainable_parameters()
    assert 0 < trainable < total
    before = state(model)
    train_one_step(case, model)
    after = state(model)
    trainable_names = {n for n, p in model.named_parameters() if p.requires_grad}
    for key in before:
        if not torch.equal(before[key], after[key]):
            assert key in trainable_names, f"frozen tensor {key} changed"


ROUTES = ("peft", "auto", "transformers", "transformers-auto")


@parametrize
def test_fresh_process_reload_is_identical(case, tmp_path):
    """Every load route (peft, AutoPeftModel, transformers' load_adapter, ModelClass.from_pretrained(adapter dir)) in
    one fresh interpreter, each from disk, gives the trained model's outputs."""
    base, base_dir = saved_base(case, tmp_path)
    model = get_peft_model(base, case.make_config())
    train_one_step(case, model)
    inputs = case.make_inputs()
    expected = run(case, model, inputs)
    adapter_dir = tmp_path / "adapter"
    model.save_pretrained(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == model.peft_config["default"].peft_type.value
    assert (adapter_dir / "adapter_model.safetensors").exists()
    save_file({k: v.contiguous() for k, v in inputs.items()}, tmp_path / "inputs.safetensors")
    out_file = tmp_path / "out.safetensors"
    cmd = [sys.executable, str(HERE / "fresh_load.py"), ",".join(ROUTES), str(base_dir), str(adapter_dir),
           str(tmp_path / "inputs.safetensors"), str(out_file), case.id]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = load_file(out_file)
    for route in ROUTES:
        torch.testing.assert_close(loaded[f"out_{route}"], expected, rtol=1e-5, atol=1e-6,
                                   msg=lambda m, route=route: f"route {route}: {m}")
        if route in ("peft", "auto"):
            assert int(loaded[f"type_ok_{route}"]) == 1, route


@parametrize
def test_merge_and_unload_equals_unmerged(case):
    if not case.mergeable:
        pytest.skip("method has nothing to merge")
    model = get_peft_model(case.make_model(), case.make_config(init_weights=False))
    train_one_step(case, model)
    expected = run(case, model)
    model.merge_adapter(safe_merge=True)
    assert_fp32_close(run(case, model), expected)
    model.unmerge_adapter()
    assert_fp32_close(run(case, model), expected)
    merged = model.merge_and_unload()
    assert type(merged) is type(case.make_model())
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    assert not any("modules_to_save" in name or "original_module" in name for name, _ in merged.named_modules())
    assert set(merged.state_dict()) == set(case.make_model().state_dict())
    assert_fp32_close(run(case, merged), expected)


@parametrize
def test_unload_restores_base_layers(case):
    """peft semantics: `unload` removes every tuner layer without merging; modules_to_save keep their trained copy."""
    reference = case.make_model().state_dict()
    model = get_peft_model(case.make_model(), case.make_config(init_weights=False))
    saved_modules = tuple(model.peft_config["default"].modules_to_save or ())
    train_one_step(case, model)
    restored = model.unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in restored.modules())
    restored_state = restored.state_dict()
    assert set(restored_state) == set(reference)
    for key, value in reference.items():
        module_name = key.rsplit(".", 1)[0]
        if not module_name.endswith(saved_modules) or not saved_modules:
            torch.testing.assert_close(restored_state[key], value, rtol=0, atol=0, msg=key)


@parametrize
def test_two_adapters_set_and_delete(case):
    model = get_peft_model(case.make_model(), case.make_config(init_weights=False))
    out_default = run(case, model)
    torch.manual_seed(123)
    model.add_adapter("other", case.make_config(init_weights=False))
    assert model.active_adapter == "default"
    torch.testing.assert_close(run(case, model), out_default, rtol=0, atol=0)
    model.set_adapter("other")
    train_one_step(case, model)
    out_other = run(case, model)
    assert not torch.allclose(out_other, out_default, atol=1e-6)
    model.set_adapter("default")
    torch.testing.assert_close(run(case, model), out_default, rtol=0, atol=0)
    model.delete_adapter("other")
    assert list(model.peft_config) == ["default"]
    assert not any("other" in name for name, _ in model.named_parameters())
    torch.testing.assert_close(run(case, model), out_default, rtol=0, atol=0)


@parametrize
def test_second_adapter_loads_from_disk(case, tmp_path):
    """A saved adapter loaded next to the model's own computes what it computed when saved; the two are told apart
    first (trained weights, and another schedule for weight-free methods), so a load that is skipped or that runs
    the first adapter instead fails."""
    model = get_peft_model(case.make_model(), (case.make_variant_config or case.make_config)(init_weights=False))
    train_one_step(case, model)
    expected = run(case, model)
    model.save_pretrained(tmp_path)
    other = get_peft_model(case.make_model(), case.make_config())
    own = run(case, other)
    assert not torch.allclose(own, expected, atol=1e-4), "the saved adapter cannot be told from the model's own"
    other.load_adapter(tmp_path, adapter_name="loaded")
    other.set_adapter("loaded")
    torch.testing.assert_close(run(case, other), expected, rtol=1e-5, atol=1e-6)
    other.set_adapter("default")
    torch.testing.assert_close(run(case, other), own, rtol=0, atol=0)


@parametrize
def test_trainable_after_reload(case, tmp_path):
    model = get_peft_model(case.make_model(), case.make_config())
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(case.make_model(), tmp_path, is_trainable=True)
    before = run(case, reloaded)
    train_one_step(case, reloaded)
    assert not torch.allclose(run(case, reloaded), before, atol=1e-7)
    frozen = PeftModel.from_pretrained(case.make_model(), tmp_path)
    assert frozen.get_nb_trainable_parameters()[0] == 0


@parametrize
def test_print_trainable_parameters(case, capsys):
    get_peft_model(case.make_model(), case.make_config()).print_trainable_parameters()
    assert "trainable params" in capsys.readouterr().out


# -- bad input --------------------------------------------------------------------------------------------------
@parametrize
def test_no_matching_target_is_rejected_and_model_untouched(case):
    model = case.make_model()
    before = copy.deepcopy(model)
    with pytest.raises(ValueError, match="does_not_exist"):
        get_peft_model(model, case.make_config(target_modules=["does_not_exist"]))
    assert str(model) == str(before)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), before.state_dict().values()))


@parametrize
@pytest.mark.parametrize("damage", ["truncated", "not-safetensors", "missing-tensor", "wrong-shape", "foreign-type"])
def test_damaged_adapter_is_rejected_and_model_untouched(case, damage, tmp_path):
    if case.weight_free and damage in ("missing-tensor", "wrong-shape"):
        pytest.skip("the adapter file holds no tensors of this weight-free method")
    model = get_peft_model(case.make_model(), case.make_config(init_weights=False))
    model.save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    config_file = tmp_path / "adapter_config.json"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "not-safetensors":
        weights.write_bytes(b"\x80\x04this is not a safetensors file")
    elif damage in ("missing-tensor", "wrong-shape"):
        tensors = load_file(weights)
        key = sorted(k for k in tensors if f".{model.base_model.prefix}" in k)[0]
        if damage == "missing-tensor":
            del tensors[key]
        else:
            tensors[key] = torch.zeros(tensors[key].numel() + 3)
        save_file(tensors, weights)
    elif damage == "foreign-type":
        config = json.loads(config_file.read_text())
        config["peft_type"] = "NOT_A_METHOD"
        config_file.write_text(json.dumps(config))
    files_before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    fresh = case.make_model()
    snapshot = copy.deepcopy(fresh)
    with pytest.raises((ValueError, TypeError, KeyError, OSError, RuntimeError)) as info:
        PeftModel.from_pretrained(fresh, tmp_path)
    message = str(info.value).lower()
    assert any(word in message for word in ("safetensors", "header", "consolidator", "not_a_method", "deserializ",
                                             "shape", "tensors", "unknown", "invalid")), message
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files_before
    assert str(fresh) == str(snapshot), "the base model was left modified after a failed load"
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), snapshot.state_dict().values()))


def test_every_registered_type_has_a_case():
    from peft_effadapt import peft_hooks

    registered = set(peft_hooks.registered_peft_types())
    covered = {case.make_config().peft_type.value for case in CASES}
    assert registered <= covered, f"methods without a conformance case: {registered - covered}"


def test_adapter_config_roundtrip_names_our_type(tmp_path):
    case = CASES[0]
    model = get_peft_model(case.make_model(), case.make_config())
    model.save_pretrained(tmp_path)
    config = peft.PeftConfig.from_pretrained(tmp_path)
    assert type(config) is type(case.make_config())
    assert AutoConfig is not None
