"""Build the example notebooks (`<method>.ipynb`) from their percent-format sources (`<method>.py`).

The `.py` files are the source of truth (reviewable diffs, runnable with plain `python`); each `# %%` line starts a
code cell and each `# %% [markdown]` line a markdown cell whose lines drop their leading `# `.

    python examples/notebooks/build.py            # rewrite every .ipynb
    python examples/notebooks/build.py --check    # exit 1 if any .ipynb is missing or stale
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
KERNEL = {"display_name": "Python 3", "language": "python", "name": "python3"}


def sources() -> list[Path]:
    return sorted(p for p in HERE.glob("*.py") if p.name != Path(__file__).name)


def _cell(kind: str, lines: list[str]) -> dict | None:
    while lines and not lines[-1].strip():
        lines.pop()
    while lines and not lines[0].strip():
        lines.pop(0)
    if not lines:
        return None
    if kind == "markdown":
        lines = [line[2:] if line.startswith("# ") else line.lstrip("#") for line in lines]
    text = [line + "\n" for line in lines]
    text[-1] = text[-1].rstrip("\n")
    cell = {"cell_type": kind, "id": "", "metadata": {}, "source": text}
    if kind == "code":
        cell.update(execution_count=None, outputs=[])
    return cell


def to_notebook(source: str) -> dict:
    """Splits a percent-format script into nbformat-4 cells (text before the first marker is a code cell)."""
    cells, kind, lines = [], "code", []
    for line in source.splitlines():
        if line.startswith("# %%"):
            cells.append(_cell(kind, lines))
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        else:
            lines.append(line)
    cells.append(_cell(kind, lines))
    cells = [c for c in cells if c is not None]
    for i, cell in enumerate(cells):
        cell["id"] = f"cell-{i}"
    return {"cells": cells, "metadata": {"kernelspec": KERNEL, "language_info": {"name": "python"}},
            "nbformat": 4, "nbformat_minor": 5}


def render(path: Path) -> str:
    return json.dumps(to_notebook(path.read_text()), indent=1, ensure_ascii=False) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    stale = []
    for src in sources():
        target = src.with_suffix(".ipynb")
        text = render(src)
        if args.check:
            if not target.is_file() or target.read_text() != text:
                stale.append(target.name)
        else:
            target.write_text(text)
            print(f"wrote {target.relative_to(HERE.parents[1])}")
    if stale:
        print(f"stale notebooks (run python examples/notebooks/build.py): {stale}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
