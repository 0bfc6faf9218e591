"""The code blocks of the Markdown documentation, read the way the tests run them (standard library only: the CI's
wheel check imports it in a fresh environment without pytest).

A fenced ```python block runs unless an HTML comment right above it says otherwise (invisible on the rendered page):

    <!-- docs-test: slow -->           runs only with `pytest -m slow` (trains for tens of seconds)
    <!-- docs-test: skip (reason) -->  never runs here (needs a GPU, a Hub token, the network); the reason is required
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

FENCE = re.compile(r"^```(\w*)\n(.*?)^```\s*$", re.S | re.M)
MARKER = re.compile(r"<!--\s*docs-test:\s*(slow|skip)\s*(?:\((.+?)\))?\s*-->\s*\n\s*\Z")


class Block(NamedTuple):
    section: str  # the heading the block sits under
    code: str
    mode: str  # "run", "slow" or "skip"
    reason: str  # why a block is skipped


def python_blocks(path: str | Path) -> list[Block]:
    """Every ```python block of a Markdown file, in order, with how the tests treat it."""
    text = Path(path).read_text()
    blocks = []
    for match in FENCE.finditer(text):
        if match.group(1) != "python":
            continue
        before = text[: match.start()]
        headings = re.findall(r"^#+ (.*)$", before, re.M)
        marker = MARKER.search(before[-300:])
        mode, reason = (marker.group(1), marker.group(2) or "") if marker else ("run", "")
        if mode == "skip" and not reason:
            raise ValueError(f"{path}: a skipped block needs a reason: <!-- docs-test: skip (why) -->")
        blocks.append(Block(headings[-1] if headings else Path(path).name, match.group(2), mode, reason))
    return blocks


def quick_start(readme: str | Path) -> str:
    """The code of the README's Quick start (the first python block under `## Quick start`)."""
    blocks = [block for block in python_blocks(readme) if block.section == "Quick start"]
    if not blocks:
        raise ValueError(f"{readme} has no python block under '## Quick start'")
    return blocks[0].code
