"""The test suite of the installed peft version, from its source distribution: a cached copy under ``.cache/`` (git
ignored), fetched with ``pip download --no-binary`` when absent. Only the sdist's ``tests/`` folder is extracted."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import peft

CACHE = Path(__file__).resolve().parent.parent / ".cache" / "peft-suite"


def peft_tests_package() -> Path:
    """The folder holding ``peft_tests/`` (peft's ``tests/`` as an importable package) for the installed peft."""
    root = CACHE / f"peft-{peft.__version__}"
    package = root / "peft_tests"
    if (package / "test_custom_models.py").exists():
        return root
    sdist = _download(root)
    members = []
    with tarfile.open(sdist) as archive:
        for member in archive.getmembers():
            parts = Path(member.name).parts
            if len(parts) > 2 and parts[1] == "tests" and (member.isfile() or member.isdir()):
                member.name = str(Path("peft_tests", *parts[2:]))
                members.append(member)
        archive.extractall(root, members=members, filter="data")
    (package / "__init__.py").touch()
    return root


def _download(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    found = sorted(root.glob("peft-*.tar.gz"))
    if found:
        return found[0]
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
               f"peft=={peft.__version__}", "--dest", str(root)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    found = sorted(root.glob("peft-*.tar.gz"))
    if result.returncode or not found:
        raise RuntimeError(f"could not fetch the peft {peft.__version__} sdist: {' '.join(command)}\n{result.stderr}")
    return found[0]
