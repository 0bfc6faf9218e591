"""Regression fixtures: tiny adapters and slimmed models that a released version saved, reloaded by today's code.

`tests/fixtures/v<version>/<case>/` holds what that version wrote (an adapter folder, or a slimmed-model folder) and:

- ``fixture.json``: ``kind`` ("adapter" or "slimmed"), ``written_by`` (the version), ``output`` (the attribute of
  the model output compared), ``inputs`` (shape and seed of every float input) and, for adapters, ``base``: the
  recipe of the base model (a factory of `FACTORIES`, its keyword arguments, a seed) and the sha256 of its weights;
- ``inputs.safetensors``: the integer inputs (token ids, masks); float inputs are redrawn from their seed;
- ``expected.safetensors``: ``output``, what the writing version computed.

Base weights are never stored: the factory builds the architecture and `redraw` overwrites every float tensor from
numpy's `RandomState`, whose stream numpy keeps fixed across releases, so the base does not depend on transformers'
initialisation or torch's random generator. The stored sha256 turns any change of the rebuilt base (a factory, a
parameter name or shape) into a clear failure instead of an output mismatch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from peft_effadapt.testing import tiny_clip, tiny_clip_vision, tiny_resnet, tiny_vit

from fp32 import assert_fp32_close
from siglip_models import tiny_siglip

FIXTURES_DIR = Path(__file__).parent / "fixtures"
FACTORIES = {"tiny_vit": tiny_vit, "tiny_clip": tiny_clip, "tiny_clip_vision": tiny_clip_vision,
             "tiny_siglip": tiny_siglip, "tiny_resnet": tiny_resnet}
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)


@torch.no_grad()
def redraw(model: nn.Module, seed: int) -> nn.Module:
    """Overwrites every float parameter and buffer, in sorted name order, from ``RandomState(seed)``: norm weights
    and BatchNorm variances around 1, other tensors of 2+ dimensions U(±1/sqrt(fan_in)) (torch's Linear default),
    the rest (biases, embeddings' 1-d vectors, logit scales) U(±0.1)."""
    rng = np.random.RandomState(seed)
    for name, tensor in sorted(model.state_dict(keep_vars=True).items()):
        if not tensor.is_floating_point():
            continue
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        if (leaf == "weight" and isinstance(owner, _NORMS)) or leaf == "running_var":
            low, high = 0.8, 1.2
        elif tensor.dim() >= 2:
            high = 1.0 / np.sqrt(tensor[0].numel())
            low = -high
        else:
            low, high = -0.1, 0.1
        values = rng.uniform(low, high, size=tuple(tensor.shape)).astype(np.float32)
        tensor.data.copy_(torch.from_numpy(values).to(tensor.dtype))
    return model


def state_sha256(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        shape, flat = tensor.shape, tensor.detach().cpu().reshape(-1).contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


def build_base(recipe: dict) -> nn.Module:
    """The base model of a recipe ``{"factory", "kwargs", "seed"}``, in eval mode."""
    return redraw(FACTORIES[recipe["factory"]](**recipe["kwargs"]), recipe["seed"]).eval()


def rebuild_base(recipe: dict, where: str) -> nn.Module:
    """`build_base`, checked against the recipe's stored sha256. Raises AssertionError naming what changed."""
    model = build_base(recipe)
    found = state_sha256(model)
    if found != recipe["sha256"]:
        raise AssertionError(
            f"{where}: the base model rebuilt from {recipe['factory']}(**{recipe['kwargs']}) with seed "
            f"{recipe['seed']} no longer has the weights this fixture was saved on (sha256 {found[:12]}, stored "
            f"{recipe['sha256'][:12]}). The factory in peft_effadapt.testing, the model class's parameter names or "
            "shapes, or `redraw` changed; the fixture's outputs can only be compared on the original base, so "
            "restore what changed (this is not a failure of the adapter format)."
        )
    return model


def draw_inputs(spec: dict, integer_inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model inputs of a fixture: integer tensors as stored, float tensors N(0, 1) from their seed."""
    inputs = dict(integer_inputs)
    for name, entry in spec.items():
        values = np.random.RandomState(entry["seed"]).standard_normal(entry["shape"]).astype(np.float32)
        inputs[name] = torch.from_numpy(values)
    return inputs


def output_name(output, tensor: torch.Tensor) -> str:
    """The key of a transformers ModelOutput that holds ``tensor``."""
    return next(key for key, value in output.items() if value is tensor)


def load_fixture(folder: Path) -> tuple[nn.Module, dict[str, torch.Tensor], dict]:
    """(model loaded by today's code, inputs, fixture.json) of one fixture folder."""
    from peft import PeftModel

    from peft_effadapt import load_slimmed

    spec = json.loads((folder / "fixture.json").read_text())
    where = f"{folder.parent.name}/{folder.name}"
    if spec["kind"] == "adapter":
        model = PeftModel.from_pretrained(rebuild_base(spec["base"], where), folder)
    elif spec["kind"] == "slimmed":
        model = load_slimmed(folder)
    else:
        raise AssertionError(f"{where}: unknown fixture kind {spec['kind']!r}")
    integer_inputs = load_file(folder / "inputs.safetensors") if (folder / "inputs.safetensors").exists() else {}
    return model.eval(), draw_inputs(spec["inputs"], integer_inputs), spec


def check_fixture(folder: Path) -> None:
    """Loads a fixture with today's code and compares its output with the stored one (fp32 tolerance)."""
    model, inputs, spec = load_fixture(folder)
    with torch.no_grad():
        actual = getattr(model(**inputs), spec["output"])
    expected = load_file(folder / "expected.safetensors")["output"]
    assert_fp32_close(actual, expected, msg=lambda m: f"{folder.parent.name}/{folder.name} ({spec['kind']}): {m}")
