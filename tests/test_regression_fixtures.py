"""Adapters and slimmed models saved by every released version load with today's code and compute what they
computed when saved (tests/fixtures/v<version>/, written by tests/fixtures/make_fixtures.py; see
tests/regression_fixtures.py for the layout). A change of a saved format ships a migration that keeps these passing.
"""

from __future__ import annotations

import json
import runpy

import pytest

from method_cases import CASES
from regression_fixtures import FIXTURES_DIR, check_fixture, rebuild_base

FIXTURES = sorted(path.parent for path in FIXTURES_DIR.glob("v*/*/fixture.json"))
SLIMMING_METHODS = {"csgd", "resrep"}


def make_fixtures():
    return runpy.run_path(str(FIXTURES_DIR / "make_fixtures.py"))


@pytest.mark.parametrize("folder", FIXTURES, ids=[f"{p.parent.name}/{p.name}" for p in FIXTURES])
def test_saved_fixture_loads_and_computes_the_saved_outputs(folder):
    spec = json.loads((folder / "fixture.json").read_text())
    assert folder.parent.name == f"v{spec['written_by']}"
    if spec["kind"] == "adapter":
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["peft_effadapt_version"] == spec["written_by"]
    check_fixture(folder)


def test_every_registered_type_and_slimming_method_has_a_fixture():
    from peft_effadapt import peft_hooks

    peft_types = {json.loads((f / "adapter_config.json").read_text())["peft_type"] for f in FIXTURES
                  if (f / "adapter_config.json").exists()}
    missing = set(peft_hooks.registered_peft_types()) - peft_types
    assert not missing, f"no regression fixture for {missing}: run tests/fixtures/make_fixtures.py --add-missing"
    methods = {json.loads((f / "slimming_plan.json").read_text())["method"] for f in FIXTURES
               if (f / "slimming_plan.json").exists()}
    assert {m.replace("-", "") for m in methods} >= SLIMMING_METHODS, methods


def test_every_method_case_has_a_base_recipe():
    assert set(make_fixtures()["BASES"]) == {case.id for case in CASES}


def test_the_generator_never_rewrites_a_version(tmp_path):
    write_fixtures = make_fixtures()["write_fixtures"]
    version_dir = tmp_path / "v0.0.1"
    (first,) = write_fixtures(version_dir, ["tome-vit-cls"])
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    with pytest.raises(FileExistsError, match="never rewritten"):
        write_fixtures(version_dir, ["tome-vit-cls"])
    assert write_fixtures(version_dir, ["tome-vit-cls"], add_missing=True) == []
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before


def test_a_base_that_no_longer_rebuilds_is_named():
    adapter = next(folder for folder in FIXTURES if (folder / "adapter_config.json").exists())
    recipe = json.loads((adapter / "fixture.json").read_text())["base"]
    rebuild_base({**recipe, "kwargs": {**recipe["kwargs"], "seed": 5}}, "same base")  # the redraw sets every weight
    with pytest.raises(AssertionError, match="no longer has the weights this fixture was saved on"):
        rebuild_base({**recipe, "seed": recipe["seed"] + 1}, "changed base")
