"""Every python block of README.md and docs/**/*.md runs as written (on the bundled testbed), extracted from the
Markdown (tests/markdown_blocks.py; a block marked `<!-- docs-test: slow -->` runs with -m slow, one marked
`<!-- docs-test: skip (reason) -->` never runs here).

Blocks run in file order, each in a fresh namespace and a fresh working folder, in a separate process (so a block
cannot lean on what an earlier test imported). The quick start must run with warnings as errors and print nothing on
stderr.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from markdown_blocks import python_blocks, quick_start

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def cases():
    for path in DOCUMENTS:
        name = path.relative_to(REPO).as_posix()
        for index, block in enumerate(python_blocks(path)):
            marks = {"run": [], "slow": [pytest.mark.slow],
                     "skip": [pytest.mark.skip(reason=block.reason)]}[block.mode]
            yield pytest.param(path, block.code, id=f"{name}:{index}:{block.section}", marks=marks)


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
    """First contact: no warning, no progress bar, no load report; just the trainable-parameter line."""
    result = run_block(quick_start(REPO / "README.md"), tmp_path, warnings_as_errors=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr == "", result.stderr[-2000:]
    assert result.stdout.startswith("trainable params"), result.stdout
    assert (tmp_path / "consolidator-adapter" / "adapter_model.safetensors").exists()


def test_the_quick_start_fits_the_readme():
    code = quick_start(REPO / "README.md")
    assert len(code.strip().splitlines()) <= 15, code
    assert len(REPO.joinpath("README.md").read_text().splitlines()) <= 200


def test_every_document_has_been_collected():
    blocks = {path.relative_to(REPO).as_posix(): python_blocks(path) for path in DOCUMENTS}
    assert len(blocks["README.md"]) == 1, blocks["README.md"]  # the quick start
    assert blocks["docs/guides/hub.md"] and blocks["docs/guides/trainer.md"] and blocks["docs/guides/custom-cnn.md"]
    for page in ("consolidator", "rlp", "qprompt", "pyra", "tempme", "csgd", "resrep", "lftl"):
        assert blocks[f"docs/{page}.md"] or page == "consolidator", page  # Consolidator's is the quick start
    assert sum(len(found) for found in blocks.values()) >= 11, {k: len(v) for k, v in blocks.items()}


def test_a_skip_marker_needs_a_reason(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# T\n\n<!-- docs-test: skip (needs a GPU) -->\n```python\nx = 1\n```\n\n"
                    "<!-- docs-test: slow -->\n```python\ny = 2\n```\n\n```python\nz = 3\n```\n")
    assert [(b.mode, b.reason) for b in python_blocks(page)] == [("skip", "needs a GPU"), ("slow", ""), ("run", "")]
    page.write_text("<!-- docs-test: skip -->\n```python\nx = 1\n```\n")
    with pytest.raises(ValueError, match="needs a reason"):
        python_blocks(page)


def test_no_link_leaves_the_repository():
    """Relative links resolve to files in the repository; nothing points to ../shared or another checkout."""
    import re

    for path in DOCUMENTS:
        text = path.read_text()
        assert "shared/papers" not in text, path.name
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://", "#", "mailto:")):
                continue
            resolved = (path.parent / target.split("#", 1)[0]).resolve()
            assert resolved.is_relative_to(REPO) and resolved.exists(), (path.name, target)
