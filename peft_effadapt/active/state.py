"""Atomic round-state files: every file is written to a temporary name in its folder, then `os.replace`d.

Only JSON and safetensors are written or read (no pickle).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn


def _tmp_path(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def write_json(path: str | os.PathLike, payload) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)


def read_json(path: str | os.PathLike):
    return json.loads(Path(path).read_text())


def write_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def write_dir(path: str | os.PathLike, fill) -> None:
    """Calls `fill(tmp_dir)`, then moves the folder to `path` (replacing a stale one from an unfinished round)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        fill(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def adapted_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters plus all buffers (batch-norm statistics move in train mode even under PEFT)."""
    state = {n: p for n, p in model.named_parameters() if p.requires_grad}
    state.update(dict(model.named_buffers()))
    return state


@torch.no_grad()
def load_adapted_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copies a saved `adapted_state` into the model, checking names and shapes before writing anything."""
    current = dict(model.named_parameters())
    current.update(dict(model.named_buffers()))
    unknown = sorted(set(state) - set(current))
    if unknown:
        raise ValueError(f"saved round state has tensors this model lacks: {unknown[:5]}; resume with the same "
                         f"model and adapter configuration.")
    bad = [k for k, v in state.items() if tuple(v.shape) != tuple(current[k].shape)]
    if bad:
        raise ValueError(f"saved round state does not match the model's shapes for {bad[:5]}.")
    for k, v in state.items():
        current[k].copy_(v.to(current[k].dtype))
