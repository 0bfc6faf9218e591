"""The README's quick start runs as written (on the bundled tiny ViT)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def quick_start_code() -> str:
    text = README.read_text()
    section = text.split("## Quick start", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_quick_start_runs(tmp_path, monkeypatch):
    from peft_effadapt.testing import checkpoint_path

    if not (checkpoint_path("tiny_vit") / "model.safetensors").exists():
        pytest.fail("the bundled tiny ViT checkpoint is missing")
    monkeypatch.chdir(tmp_path)
    exec(compile(quick_start_code(), str(README), "exec"), {"__name__": "readme"})
    assert (tmp_path / "consolidator-adapter" / "adapter_model.safetensors").exists()
