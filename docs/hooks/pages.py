"""mkdocs hooks of the documentation site (mkdocs.yml `hooks:`).

* The home page is the repository's README.md (docs/index.md holds only a comment and the marker `--8<-- README`).
* Links are written as on GitHub, relative to the Markdown file they sit in: in docs/ pages (`rlp.md`,
  `../benchmarks/results/pyra.png`) and in README.md (`docs/rlp.md`). A link that leaves docs/ (a plot, a results
  JSON, an example script, the CHANGELOG) gets its target copied into the site under `repo/<path>` at build time and
  is rewritten to it, so no page links outside the site and nothing is copied by hand. A link to a file that does
  not exist fails the build, as does a link that leaves the repository.
* The build fails when a name of `peft_effadapt.__all__` is not on an API page or lacks its docstring
  (api_reference.py; tests/test_docs.py runs the same check without mkdocs).
"""

from __future__ import annotations

import posixpath
import re
import sys
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

sys.path.insert(0, str(Path(__file__).parent))
from api_reference import reference_gaps  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
README_MARKER = "--8<-- README"
OUTSIDE = "repo"  # site folder of the files linked from outside docs/
LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s]+)(\))")
FENCE = re.compile(r"^(```|~~~).*?^\1\s*$", re.S | re.M)
INCLUDED_AS_PAGE = {"CHANGELOG.md": "changelog.md", "README.md": "index.md"}  # outside docs/, shown by a page


def _source(src_uri: str) -> Path:
    """The Markdown file a page's text comes from."""
    return REPO / "README.md" if src_uri == "index.md" else DOCS / src_uri


def _outside_target(source: Path, target: str) -> Path | None:
    """The repository file a relative link of `source` points to, when it lies outside docs/ (else None)."""
    if target.startswith(("http://", "https://", "mailto:", "#")):
        return None
    path = target.split("#", 1)[0]
    resolved = (source.parent / path).resolve()
    if not resolved.is_relative_to(REPO):
        raise PluginError(f"{source.relative_to(REPO)} links to {target}, outside the repository")
    if not resolved.exists():
        raise PluginError(f"{source.relative_to(REPO)} links to {target}, which does not exist")
    return None if resolved.is_relative_to(DOCS) else resolved


def _links(markdown: str) -> list[re.Match]:
    """Inline links and images outside fenced code blocks."""
    fences = [m.span() for m in FENCE.finditer(markdown)]
    return [m for m in LINK.finditer(markdown) if not any(a <= m.start() < b for a, b in fences)]


def on_config(config, **kwargs):
    gaps = reference_gaps(DOCS / "api")
    if gaps:
        raise PluginError("API reference incomplete:\n  " + "\n  ".join(gaps))
    return config


def on_files(files, config, **kwargs):
    """Copy every file outside docs/ that a page links to into the site, under repo/<path>."""
    linked = set()
    for file in list(files.documentation_pages()):
        source = _source(file.src_uri)
        text = source.read_text() if file.src_uri == "index.md" else Path(file.abs_src_path).read_text()
        for match in _links(text):
            target = _outside_target(source, match.group(2))
            if target is not None:
                linked.add(target.relative_to(REPO).as_posix())
    for path in sorted(linked - set(INCLUDED_AS_PAGE)):
        if path.endswith(".md"):
            raise PluginError(f"a page links to {path}: Markdown outside docs/ must be included by a docs page")
        files.append(File.generated(config, f"{OUTSIDE}/{path}", abs_src_path=str(REPO / path)))
    return files


def on_page_markdown(markdown, page, config, files, **kwargs):
    """The README as the home page; links that leave docs/ point to their copies (or including pages) in the site."""
    src_uri = page.file.src_uri
    if re.sub(r"<!--.*?-->", "", markdown, flags=re.S).strip() == README_MARKER:
        markdown = (REPO / "README.md").read_text()
    source = _source(src_uri)
    page_dir = posixpath.dirname(src_uri)

    def rewrite(match: re.Match) -> str:
        target = match.group(2)
        path, _, anchor = target.partition("#")
        outside = _outside_target(source, target)
        if outside is not None:
            relative = outside.relative_to(REPO).as_posix()
            site_path = INCLUDED_AS_PAGE.get(relative, f"{OUTSIDE}/{relative}")
        elif src_uri == "index.md" and not target.startswith(("http", "#", "mailto:")):
            site_path = (source.parent / path).resolve().relative_to(DOCS).as_posix()
        else:
            return match.group(0)
        new = posixpath.relpath(site_path, page_dir or ".") + (f"#{anchor}" if anchor else "")
        return f"{match.group(1)}{new}{match.group(3)}"

    fences = [m.span() for m in FENCE.finditer(markdown)]
    return LINK.sub(lambda m: m.group(0) if any(a <= m.start() < b for a, b in fences) else rewrite(m), markdown)
