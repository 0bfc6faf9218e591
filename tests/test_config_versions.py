"""Saved configs record the writing version; fields a newer peft_effadapt wrote are dropped with one warning, while
unknown fields of this or an older version (or of a file recording no version) still raise with the closest name.

The saved objects are the committed regression fixtures (tests/regression_fixtures.py), edited in a copy as a newer
release would write them; their stored outputs show that the edited copy computes what the original does.
"""

from __future__ import annotations

import json
import shutil
import warnings

import peft
import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model

import peft_effadapt

from method_cases import CASES
from regression_fixtures import FIXTURES_DIR, check_fixture, load_fixture, rebuild_base

INSTALLED = peft_effadapt.__version__
NEWER = "99.0.0"
CURRENT = sorted(path.parent for path in (FIXTURES_DIR / f"v{INSTALLED}").glob("*/fixture.json"))
ADAPTERS = [folder for folder in CURRENT if (folder / "adapter_config.json").exists()]
SLIMMED = [folder for folder in CURRENT if (folder / "slimming_plan.json").exists()]
adapters = pytest.mark.parametrize("fixture", ADAPTERS, ids=[folder.name for folder in ADAPTERS])


def test_the_installed_version_has_its_fixtures():
    """The same-version tests below run on the fixtures this version wrote: after a version bump they exist only once
    tests/fixtures/make_fixtures.py has run (otherwise those tests would collect nothing and pass silently)."""
    assert ADAPTERS and SLIMMED, f"no fixtures for {INSTALLED}: run python tests/fixtures/make_fixtures.py"


def copy_with(fixture, tmp_path, file_name, edit):
    folder = tmp_path / fixture.name
    shutil.copytree(fixture, folder)
    data = json.loads((folder / file_name).read_text())
    edit(data)
    (folder / file_name).write_text(json.dumps(data))
    return folder


def newer_config(data):
    data["peft_effadapt_version"] = NEWER
    data["option_from_the_future"] = [1, 2]
    data["mode_from_the_future"] = "fast"


def version_warnings(record):
    return [str(w.message) for w in record if "newer than the installed" in str(w.message)]


def assert_names_fields_and_versions(message, fields):
    for field in fields:
        assert repr(field) in message, message
    assert f"peft_effadapt {NEWER}" in message and f"installed {INSTALLED}" in message, message
    assert "upgrade peft_effadapt" in message.lower(), message


# -- what is written ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_every_saved_config_records_the_installed_version(case, tmp_path):
    model = get_peft_model(case.make_model(), case.make_config())
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_effadapt_version"] == INSTALLED
    config = PeftConfig.from_pretrained(tmp_path)
    assert type(config) is type(model.peft_config["default"]) and config.peft_effadapt_version == INSTALLED


def test_a_config_built_in_code_records_no_reader_version_until_saved():
    config = CASES[0].make_config()
    assert config.peft_effadapt_version is None
    assert config.to_dict()["peft_effadapt_version"] == INSTALLED


@pytest.mark.parametrize("fixture", SLIMMED, ids=[folder.name for folder in SLIMMED])
def test_slimming_plan_records_the_installed_version(fixture, tmp_path):
    from peft_effadapt.pruning import SlimmingPlan

    plan = SlimmingPlan.load(fixture)
    plan.save(tmp_path)
    assert json.loads((tmp_path / "slimming_plan.json").read_text())["peft_effadapt_version"] == INSTALLED


# -- a newer writer: dropped with one warning, same outputs -------------------------------------------------------
@adapters
def test_newer_writer_fields_are_dropped_with_one_warning(fixture, tmp_path):
    folder = copy_with(fixture, tmp_path, "adapter_config.json", newer_config)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        edited, inputs, _ = load_fixture(folder)
    (message,) = version_warnings(record)
    assert_names_fields_and_versions(message, ["mode_from_the_future", "option_from_the_future"])
    original, _, _ = load_fixture(fixture)
    with torch.no_grad():
        torch.testing.assert_close(edited(**inputs), original(**inputs), rtol=0, atol=0)
    check_fixture(folder)
    assert edited.peft_config["default"].peft_effadapt_version == NEWER


@pytest.mark.parametrize("route", ["config", "auto", "transformers"])
def test_every_load_route_warns_once_and_loads(route, tmp_path):
    fixture = next(folder for folder in ADAPTERS if folder.name == "rlp-clip")
    base_dir = tmp_path / "base"
    spec = json.loads((fixture / "fixture.json").read_text())
    rebuild_base(spec["base"], fixture.name).save_pretrained(base_dir)

    def edit(data):
        newer_config(data)
        data["base_model_name_or_path"] = str(base_dir)

    folder = copy_with(fixture, tmp_path, "adapter_config.json", edit)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        if route == "config":
            loaded = PeftConfig.from_pretrained(folder)
        elif route == "auto":
            loaded = peft.AutoPeftModel.from_pretrained(folder)
        else:
            loaded = type(rebuild_base(spec["base"], fixture.name)).from_pretrained(base_dir)
            loaded.load_adapter(str(folder))
    (message,) = version_warnings(record)
    assert_names_fields_and_versions(message, ["option_from_the_future"])
    if route == "config":
        assert isinstance(loaded, peft_effadapt.RLPConfig) and not hasattr(loaded, "option_from_the_future")
        return
    _, inputs, _ = load_fixture(fixture)
    original, _, _ = load_fixture(fixture)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(**inputs).logits_per_image, original(**inputs).logits_per_image,
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fixture", SLIMMED, ids=[folder.name for folder in SLIMMED])
def test_newer_slimming_plan_fields_are_dropped_with_one_warning(fixture, tmp_path):
    def edit(data):
        data["peft_effadapt_version"] = NEWER
        data["option_from_the_future"] = True
        data["groups"][0]["group_option_from_the_future"] = 3

    folder = copy_with(fixture, tmp_path, "slimming_plan.json", edit)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        check_fixture(folder)
    (message,) = version_warnings(record)
    assert_names_fields_and_versions(message, ["option_from_the_future", "groups[].group_option_from_the_future"])


# -- this version, an older one or none: a typo or damage, refused ------------------------------------------------
@adapters
@pytest.mark.parametrize("writer", [INSTALLED, "0.0.1", None], ids=["same", "older", "unrecorded"])
def test_unknown_field_of_this_or_an_older_version_raises_with_the_closest_name(fixture, writer, tmp_path):
    def edit(data):
        if writer is None:
            del data["peft_effadapt_version"]
        else:
            data["peft_effadapt_version"] = writer
        data["inference_modee"] = data.pop("inference_mode")

    folder = copy_with(fixture, tmp_path, "adapter_config.json", edit)
    spec = json.loads((folder / "fixture.json").read_text())
    base = rebuild_base(spec["base"], fixture.name)
    with pytest.raises(ValueError, match="'inference_modee' \\(did you mean 'inference_mode'\\?\\)") as info:
        PeftModel.from_pretrained(base, folder)
    message = str(info.value)
    assert (f"written by peft_effadapt {writer}" if writer else "records no peft_effadapt_version") in message
    assert "upgrade" not in message.lower()


@pytest.mark.parametrize("writer", [INSTALLED, None], ids=["same", "unrecorded"])
def test_unknown_slimming_plan_field_of_this_version_raises(writer, tmp_path):
    from peft_effadapt import load_slimmed

    def edit(data):
        data.pop("peft_effadapt_version")
        if writer is not None:
            data["library_version"] = writer  # what plans written before peft_effadapt_version was recorded hold
        data["groups"][0]["keepp"] = data["groups"][0].pop("keep")

    folder = copy_with(SLIMMED[0], tmp_path, "slimming_plan.json", edit)
    with pytest.raises(ValueError, match="'keepp' \\(did you mean 'keep'\\?\\)"):
        load_slimmed(folder)


@pytest.mark.parametrize("value", ["soon", 2, ["0.1.0"]])
def test_a_recorded_version_that_is_no_version_is_refused(value, tmp_path):
    folder = copy_with(ADAPTERS[0], tmp_path, "adapter_config.json",
                       lambda data: data.update(peft_effadapt_version=value))
    with pytest.raises(ValueError, match="peft_effadapt_version must be a version string"):
        PeftConfig.from_pretrained(folder)


def test_a_typo_in_a_constructor_call_raises():
    with pytest.raises(TypeError, match="rnak"):
        peft_effadapt.RLPConfig(rnak=2)
    with pytest.raises(TypeError, match="option_from_the_future"):
        peft_effadapt.ToMeConfig(option_from_the_future=1, peft_effadapt_version=NEWER)
