"""Pushing adapters with their cards to a loopback Hub, then loading them by repo id in fresh processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from peft import get_peft_model
from safetensors.torch import save_file

from peft_effadapt.hub import push_adapter_to_hub, render_model_card

from method_cases import CASES

HERE = Path(__file__).parent
LOAD_BY_REPO_ID = """
import sys, torch, transformers, peft
from safetensors.torch import load_file, save_file
import peft_effadapt
sys.path.insert(0, {here!r})
from method_cases import CASES
case = next(c for c in CASES if c.id == {case_id!r})
route, repo_id, base_dir, inputs, out = sys.argv[1:]
if route == "auto":
    model = getattr(peft, case.auto_class).from_pretrained(repo_id)
else:
    config = transformers.AutoConfig.from_pretrained(base_dir)
    base = getattr(transformers, config.architectures[0]).from_pretrained(base_dir)
    model = peft.PeftModel.from_pretrained(base, repo_id)
model.eval()
with torch.no_grad():
    save_file({{"out": case.output(model(**load_file(inputs))).contiguous()}}, out)
"""

def _first_case_per_type_with_a_card():
    chosen = {}
    for case in CASES:
        method = case.make_config().peft_type.value.lower()
        if method not in chosen and (Path(__file__).parents[1] / "hub_cards" / f"{method}.md").exists():
            chosen[method] = case
    return list(chosen.values())


with_card = _first_case_per_type_with_a_card()


def load_in_fresh_process(case, route, repo_id, base_dir, inputs, out, env):
    code = LOAD_BY_REPO_ID.format(here=str(HERE), case_id=case.id)
    result = subprocess.run([sys.executable, "-c", code, route, repo_id, str(base_dir), str(inputs), str(out)],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    from safetensors.torch import load_file

    return load_file(out)["out"]


@pytest.mark.parametrize("case", with_card, ids=[c.id for c in with_card])
def test_push_keeps_card_and_loads_by_repo_id_then_offline(case, hub, tmp_path):
    base = case.make_model()
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    model = get_peft_model(type(base).from_pretrained(base_dir).eval(), case.make_config(init_weights=False))
    inputs = case.make_inputs()
    with torch.no_grad():
        expected = case.output(model.eval()(**inputs))
    save_file({k: v.contiguous() for k, v in inputs.items()}, tmp_path / "inputs.safetensors")

    repo_id = "effadapt-test/" + case.id
    url = push_adapter_to_hub(model, repo_id, token="hf_dummy", metrics={"accuracy": 0.875},
                              training_data="Generated shapes (peft_effadapt.testing).", license="apache-2.0")
    assert repo_id in url
    files = hub.repos[repo_id]["files"]
    assert set(files) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}

    card = ModelCard(files["README.md"].decode())
    method = case.make_config().peft_type.value.lower()
    assert card.data.library_name == "peft"
    assert card.data.base_model == str(base_dir)
    assert method in card.data.tags and "peft-effadapt" in card.data.tags
    assert "import peft_effadapt" in card.text and "| accuracy | 0.875 |" in card.text
    assert json.loads(files["adapter_config.json"])["peft_type"] == method.upper()

    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "hub-cache"), "HF_TOKEN": "hf_dummy",
           "HF_HUB_OFFLINE": "0"}
    for route in ("auto", "peft"):
        out = load_in_fresh_process(case, route, repo_id, base_dir, tmp_path / "inputs.safetensors",
                                    tmp_path / f"out-{route}.safetensors", env)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)

    hub.__exit__()  # the Hub goes away: the cache alone must serve a reload
    offline = {**env, "HF_HUB_OFFLINE": "1"}
    out = load_in_fresh_process(case, "peft", repo_id, base_dir, tmp_path / "inputs.safetensors",
                                tmp_path / "out-offline.safetensors", offline)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "repo_id,token,kwargs,match",
    [("not a repo id!", "hf_dummy", {}, "Malformed repo id"),
     ("no-owner", "hf_dummy", {}, "must name its owner"),
     ("org/name", None, {}, "No Hugging Face token"),
     ("org/name", "hf_dummy", {"base_model": ""}, "needs the base model")],
)
def test_bad_push_inputs_fail_before_any_upload(repo_id, token, kwargs, match, hub, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("peft_effadapt.hub.get_token", lambda: None)
    case = CASES[0]
    model = get_peft_model(case.make_model(), case.make_config())  # from a config: no base_model_name_or_path
    with pytest.raises(ValueError, match=match):
        push_adapter_to_hub(model, repo_id, token=token, **kwargs)
    assert hub.repos == {} and not any(method == "POST" for method, _ in hub.requests)


def test_card_renders_storage_and_config(tmp_path):
    case = CASES[0]
    model = get_peft_model(case.make_model(), case.make_config())
    model.save_pretrained(tmp_path / "training")
    card = render_model_card(tmp_path / "training", "org/adapter", base_model="google/vit-base-patch16-224-in21k")
    assert "raw branches; `model.consolidate()` before saving" in card.text
    model.consolidate()
    model.save_pretrained(tmp_path)
    card = render_model_card(tmp_path, "org/adapter", base_model="google/vit-base-patch16-224-in21k")
    assert "Consolidator" in card.text and "float32, consolidated sparse delta" in card.text
    assert card.data.base_model == "google/vit-base-patch16-224-in21k"
    assert "base_model:adapter:google/vit-base-patch16-224-in21k" in card.data.tags
