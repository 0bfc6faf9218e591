"""An adapter loaded onto a model it does not fit (other width, depth or family) is refused before anything is
injected: a ValueError naming the layer (and, for another width, both shapes), with the model exactly as it was."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from peft import PeftModel, get_peft_model

from peft_effadapt.testing import tiny_clip, tiny_vit

from method_cases import CASES

torch.set_num_threads(1)

_SAVED: dict[str, dict[str, bytes]] = {}


def saved_adapter(case, folder):
    if case.id not in _SAVED:
        get_peft_model(case.make_model(), case.make_config(init_weights=False)).save_pretrained(folder)
        _SAVED[case.id] = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    else:
        for name, data in _SAVED[case.id].items():
            (folder / name).write_bytes(data)
    return folder


def _sub_configs(config):
    return [c for c in (config, getattr(config, "text_config", None), getattr(config, "vision_config", None))
            if c is not None and hasattr(c, "hidden_size")]


def wider(model):
    """The same architecture with every tower's width and MLP width doubled (head count unchanged)."""
    config = copy.deepcopy(model.config)
    for sub in _sub_configs(config):
        sub.hidden_size *= 2
        sub.intermediate_size *= 2
    torch.manual_seed(0)
    return type(model)(config)


def other_depth(model, change):
    config = copy.deepcopy(model.config)
    for sub in _sub_configs(config):
        sub.num_hidden_layers += change
    torch.manual_seed(0)
    return type(model)(config)


def other_family(model):
    return tiny_vit(seed=0) if "clip" in type(model).__name__.lower() else tiny_clip(seed=0)


def state(model):
    return {key: value.clone() for key, value in model.state_dict().items()}


def assert_refused_untouched(model, folder, match):
    text, before, modules = str(model), state(model), len(list(model.modules()))
    with pytest.raises(ValueError, match=match) as info:
        PeftModel.from_pretrained(model, folder)
    assert str(model) == text and len(list(model.modules())) == modules, "modules were injected"
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not hasattr(model, "peft_config"), "peft_config was left on the model"
    return str(info.value)


SHAPE = r"\(\d+(, \d+)*,?\)"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_wider_model_is_refused_with_layer_and_both_shapes(case, tmp_path):
    folder = saved_adapter(case, tmp_path)
    message = assert_refused_untouched(wider(case.make_model()), folder, match="does not fit this model")
    assert re.search(rf"layer '[\w.]+' needs .* of shape {SHAPE}, the file holds shape {SHAPE}", message), message


def _has_layer_tensors(folder) -> bool:
    from safetensors import safe_open

    with safe_open(folder / "adapter_model.safetensors", framework="pt") as handle:
        return any(".layers." in key for key in handle.keys())  # noqa: SIM118 - safe_open handles have keys()


@pytest.mark.parametrize("change", [1, -1], ids=["deeper", "shallower"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_model_of_another_depth_is_refused_naming_the_layers(case, change, tmp_path):
    """Tensors per encoder layer: refused, naming the layers one side lacks. Otherwise (a text prompt, ToMe's
    schedule) the adapter may fit, or the method's own depth check refuses it; either way cleanly."""
    folder = saved_adapter(case, tmp_path)
    model = other_depth(case.make_model(), change)
    if _has_layer_tensors(folder):
        message = assert_refused_untouched(model, folder, match="layer")
        side = "lacks tensors for layers of this model" if change > 0 else "layers this model does not have or adapt"
        # the fit check, or the method's own depth check that runs first (PYRA's schedule, TempMe's merge layers)
        assert re.search(rf"does not fit this model: .*{side}: \[.*layers\.|made for 2 layers|layer indices",
                         message), message
        return
    try:
        snapshot = copy.deepcopy(model)
        loaded = PeftModel.from_pretrained(model, folder)
    except ValueError as err:
        assert "layer" in str(err), err
        assert str(model) == str(snapshot) and not hasattr(model, "peft_config")
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), snapshot.state_dict().values()))
    else:
        assert type(loaded) is PeftModel


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_model_of_another_family_is_refused_untouched(case, tmp_path):
    folder = saved_adapter(case, tmp_path)
    assert_refused_untouched(other_family(case.make_model()), folder, match=".")



def test_the_fit_check_leaves_the_random_stream_alone(tmp_path):
    """The pre-injection dry run initialises adapter weights on a shadow model; the user's RNG must not move."""
    from peft import PeftConfig
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    from peft_effadapt.peft_hooks import _expected_saved_tensors

    case = next(c for c in CASES if c.id == "consolidator-vit-cls")
    folder = saved_adapter(case, tmp_path)
    config = PeftConfig.from_pretrained(folder)
    model = case.make_model()
    state = torch.get_rng_state()
    expected = _expected_saved_tensors(PEFT_TYPE_TO_TUNER_MAPPING[config.peft_type], model, config, "default")
    assert expected  # the dry run ran and saw the adapter's tensors
    assert torch.equal(torch.get_rng_state(), state)
