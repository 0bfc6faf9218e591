"""Every python block of README.md and docs/**/*.md runs as written (on the bundled testbed), extracted from the Markdown.

Blocks run in file order, each in a fresh namespace and a fresh working folder, in a separate process (so a block
cannot lean on what an earlier test imported). The quick start must run with warnings as errors.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
# blocks that train for a few hundred steps or compile with inductor (tens of seconds of CPU each): run with -m slow
SLOW_SECTIONS = {"C-SGD", "ResRep", "LFTL", "compile_for_inference"}
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\s*$", re.S | re.M)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def python_blocks(path: Path) -> list[tuple[str, str]]:
    """(section heading, code) of every ```python block, in order."""
    text = path.read_text()
    blocks = []
    for match in FENCE.finditer(text):
        if match.group(1) == "python":
            headings = re.findall(r"^#+ (.*)$", text[: match.start()], re.M)
            blocks.append((headings[-1] if headings else path.name, match.group(2)))
    return blocks


def cases():
    for path in DOCUMENTS:
        for index, (section, code) in enumerate(python_blocks(path)):
            marks = [pytest.mark.slow] if any(word in section for word in SLOW_SECTIONS) else []
            yield pytest.param(path, code, id=f"{path.name}:{index}:{section}", marks=marks)


def run_block(code: str, folder: Path, warnings_as_errors: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    if warnings_as_errors:
        env["PYTHONWARNINGS"] = "error"
    return subprocess.run([sys.executable, "-c", code], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=900)


@pytest.mark.parametrize("path,code", list(cases()))
def test_python_block_runs(path, code, tmp_path):
    result = run_block(code, tmp_path)
    assert result.returncode == 0, f"{path.name} block failed:\n{code}\n{result.stderr[-3000:]}"


def test_quick_start_is_quiet_and_merges_exactly(tmp_path):
    section = REPO.joinpath("README.md").read_text().split("## Quick start", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    result = run_block(code, tmp_path, warnings_as_errors=True)
    assert result.returncode == 0, result.stderr[-3000:]
    # Python warnings are errors above; transformers' own load report and label warnings must not appear either
    # (its one-line "Loading weights" progress bar on from_pretrained is left to transformers' settings)
    for noise in ("LOAD REPORT", "num_labels", "Warning", "deprecated"):
        assert noise not in result.stderr, result.stderr[-2000:]
    assert "trainable params" in result.stdout
    assert (tmp_path / "consolidator-adapter" / "adapter_model.safetensors").exists()


def test_every_document_has_been_collected():
    blocks = {path.name: len(python_blocks(path)) for path in DOCUMENTS}
    assert blocks["README.md"] >= 9, blocks  # quick start + one per method section + the Hub card


def test_no_link_leaves_the_repository():
    """Relative links resolve to files in the repository; nothing points to ../shared or another checkout."""
    for path in DOCUMENTS:
        text = path.read_text()
        assert "shared/papers" not in text, path.name
        for target in LINK.findall(text):
            if target.startswith(("http://", "https://", "#", "mailto:")):
                continue
            resolved = (path.parent / target.split("#", 1)[0]).resolve()
            assert resolved.is_relative_to(REPO) and resolved.exists(), (path.name, target)
