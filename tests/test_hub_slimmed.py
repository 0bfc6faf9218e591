"""Pushing a slimmed model (weights + slimming plan + card) to a loopback Hub and loading it by repo id."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file
from transformers import ResNetConfig, ResNetForImageClassification

from peft_effadapt.hub import push_slimmed_model_to_hub
from peft_effadapt.pruning import apply_plan, find_channel_groups, plan_from_widths, save_slimmed

LOAD = """
import sys, torch
from safetensors.torch import load_file, save_file
from peft_effadapt.pruning import load_slimmed
torch.set_num_threads(1)
model = load_slimmed(sys.argv[1])
with torch.no_grad():
    save_file({"out": model(pixel_values=load_file(sys.argv[2])["x"]).logits.contiguous()}, sys.argv[3])
"""


def slimmed_folder(path: Path) -> tuple[Path, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[16, 32], depths=[1, 1],
                                                      num_labels=3)).eval()
    groups = find_channel_groups(model)
    plan = plan_from_widths(model, groups, {"stage0.layer0.conv0": 2, "stage1": 16}, method="resrep")
    plan.metadata["flops_ratio"] = 0.61
    apply_plan(model, plan)
    save_slimmed(model, plan, path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        return path, x, model(pixel_values=x).logits


def test_push_slimmed_model_and_load_by_repo_id(hub, tmp_path):
    folder, x, expected = slimmed_folder(tmp_path / "slim")
    repo_id = "effadapt-test/slim-resnet"
    url = push_slimmed_model_to_hub(folder, repo_id, token="hf_dummy", metrics={"accuracy": 0.9},
                                    training_data="Generated shapes.", license="apache-2.0")
    assert repo_id in url
    files = hub.repos[repo_id]["files"]
    assert set(files) == {"config.json", "model.safetensors", "slimming_plan.json", "README.md"}
    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "transformers" and "resrep" in card.data.tags
    assert "load_slimmed(\"effadapt-test/slim-resnet\")" in card.text and "| 0.610 |" in card.text.replace(
        "remaining FLOPs (fraction of the original) | 0.610 |", "| 0.610 |")
    assert "| stage1 | 32 | 16 |" in card.text and "| accuracy | 0.9 |" in card.text

    save_file({"x": x}, tmp_path / "x.safetensors")
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "hub-cache"), "HF_TOKEN": "hf_dummy",
           "HF_HUB_OFFLINE": "0", "OMP_NUM_THREADS": str(torch.get_num_threads())}  # same kernels: bitwise
    result = subprocess.run([sys.executable, "-c", LOAD, repo_id, str(tmp_path / "x.safetensors"),
                             str(tmp_path / "out.safetensors")], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.equal(load_file(tmp_path / "out.safetensors")["out"], expected)


def test_bad_folders_and_ids_fail_before_any_upload(hub, tmp_path):
    folder, _, _ = slimmed_folder(tmp_path / "slim")
    with pytest.raises(ValueError, match="must name its owner"):
        push_slimmed_model_to_hub(folder, "no-owner", token="hf_dummy")
    with pytest.raises(ValueError, match="not a slimmed-model folder"):
        push_slimmed_model_to_hub(tmp_path, "org/name", token="hf_dummy")
    (folder / "slimming_plan.json").write_text((folder / "slimming_plan.json").read_text().replace(
        '"keep": [\n   0,\n   1\n  ]', '"keep": [\n   0,\n   1,\n   2\n  ]'))
    weights = load_file(folder / "model.safetensors")
    weights["classifier.1.weight"] = weights["classifier.1.weight"][:, :8].contiguous()
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(ValueError, match="does not match"):
        push_slimmed_model_to_hub(folder, "org/name", token="hf_dummy")
    assert hub.repos == {} and not any(method == "POST" for method, _ in hub.requests)
