"""The documentation site: every public name is in the generated API reference with a peft-style docstring (default
run, no mkdocs needed); marked slow, `mkdocs build --strict` and the built pages rendered in headless Chromium."""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "docs" / "hooks"))

import api_reference  # noqa: E402


def test_every_public_name_is_in_the_api_reference_with_its_docstring():
    assert api_reference.reference_gaps(REPO / "docs" / "api") == []


def test_the_reference_check_finds_each_gap(tmp_path):
    def undocumented(x):
        return x

    def no_returns(x):
        """Doubles.

        Args:
            x: a number.
        """
        return 2 * x

    assert api_reference.docstring_gaps(undocumented, "f") == ["f has no docstring of its own"]
    assert api_reference.docstring_gaps(no_returns, "g") == ["g is a function whose docstring has no Returns section"]
    (tmp_path / "page.md").write_text("# P\n\n::: peft_effadapt.RLPConfig\n\n::: peft_effadapt.NotAName\n")
    assert api_reference.documented_names(tmp_path) == {"RLPConfig": "page.md", "NotAName": "page.md"}
    gaps = api_reference.reference_gaps(tmp_path)
    assert "page.md documents peft_effadapt.NotAName, which is not in __all__" in gaps
    assert "peft_effadapt.ConsolidatorConfig is in __all__ but on no page of " + tmp_path.name + "/" in gaps


def docstring_examples() -> list:
    """(name, code) of every ```python example in the docstrings of the public names."""
    import peft_effadapt

    found = []
    for name in peft_effadapt.__all__:
        doc = inspect.getdoc(getattr(peft_effadapt, name)) or ""
        found += [pytest.param(code, id=name) for code in re.findall(r"```python\n(.*?)```", doc, re.S)]
    return found


@pytest.mark.parametrize("code", docstring_examples())
def test_docstring_examples_run(code, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "PYTHONWARNINGS": "error"}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and result.stderr == "", result.stderr[-3000:]


def _need(tool_found: bool, what: str) -> None:
    if not tool_found:
        if os.environ.get("CI"):
            pytest.fail(f"{what} is missing in CI (.ci/run installs it)")
        pytest.skip(f"{what} is not installed")


def build_site(site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)


def chromium(*args: str) -> subprocess.CompletedProcess:
    """Headless Chromium as root in a container: no sandbox, no GPU, no network chatter, a throwaway profile."""
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([shutil.which("chromium"), "--headless", "--no-sandbox", "--disable-gpu",
                               "--disable-background-networking", "--disable-component-update", "--disable-sync",
                               "--no-first-run", f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=120)


def visible_text(dom: str) -> str:
    """The rendered text outside code blocks: what a reader sees as prose."""
    dom = re.sub(r"<(script|style|pre|code)\b.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"<[^>]+>", " ", dom)


@pytest.mark.slow
def test_the_site_builds_strictly_and_renders_in_chromium(tmp_path):
    """DOCS_SITE: a site that `mkdocs build --strict` just built (.ci/run builds it once); else it is built here."""
    _need(shutil.which("chromium") is not None, "chromium (apt-get install chromium)")
    site = Path(os.environ.get("DOCS_SITE") or tmp_path / "site")
    if not os.environ.get("DOCS_SITE"):
        _need(importlib.util.find_spec("mkdocs") is not None, "mkdocs (pip install '.[docs]')")
        built = build_site(site)
        assert built.returncode == 0, built.stderr[-4000:]
    for page, title in [("index.html", "peft_effadapt"), ("pyra/index.html", "PYRA and ToMe")]:
        result = chromium("--dump-dom", (site / page).as_uri())
        dom = result.stdout
        assert result.returncode == 0 and "</html>" in dom, (page, result.stderr[-2000:])
        assert re.search(rf"<title>[^<]*{re.escape(title)}[^<]*</title>", dom), page  # title
        assert 'class="md-nav' in dom and 'href="' in dom and "Getting started" in dom, page  # navigation
        assert re.search(r'<div class="highlight"><pre[^>]*>.*?<span class="kn">import</span>', dom, re.S), page  # code
        image = re.search(r'<img[^>]+src="([^"]+\.png)"', dom)
        assert image and (site / page).parent.joinpath(image.group(1)).resolve().is_file(), page  # an image
        prose = visible_text(dom)
        for raw in ("```", "](", "**", "--8<--", "::: peft_effadapt"):  # no Markdown left unrendered
            assert raw not in prose, (page, raw)
    api = chromium("--dump-dom", (site / "api" / "peft-types" / "index.html").as_uri()).stdout
    assert 'id="peft_effadapt.ConsolidatorConfig"' in api and "fc_groups" in api  # generated from the docstrings


def test_links_that_leave_docs_point_to_copies_in_the_site():
    pytest.importorskip("mkdocs")
    from types import SimpleNamespace

    import pages as hooks  # docs/hooks/pages.py (docs/hooks is first on sys.path)
    from mkdocs.exceptions import PluginError

    assert Path(hooks.__file__).parent == REPO / "docs" / "hooks"

    def render(markdown: str, src_uri: str) -> str:
        return hooks.on_page_markdown(markdown, SimpleNamespace(file=SimpleNamespace(src_uri=src_uri)), None, None)

    guide = "![plot](../../benchmarks/results/pyra.png) [code](```not a link```) [page](../pyra.md#tome)"
    assert render(guide, "guides/trainer.md") == (
        "![plot](../repo/benchmarks/results/pyra.png) [code](```not a link```) [page](../pyra.md#tome)")
    assert render("[log](../CHANGELOG.md) [x](https://example.org)", "pyra.md") == (
        "[log](changelog.md) [x](https://example.org)")
    home = render(hooks.README_MARKER, "index.md")
    assert "](rlp.md)" in home and "](docs/" not in home
    with pytest.raises(PluginError, match="does not exist"):
        render("[gone](../benchmarks/results/nothing.png)", "pyra.md")
    with pytest.raises(PluginError, match="outside the repository"):
        render("[out](../../../etc/passwd)", "pyra.md")
