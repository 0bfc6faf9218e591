"""The built sdist and wheel hold every file of the package source tree (modules, bundled checkpoints, Hub cards,
metric modules, py.typed) and nothing from outside it but metadata. Usage: python .ci/check_dist.py dist/"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "peft_effadapt"


def source_files() -> set[str]:
    """The package's files as git tracks them (a fresh clone has no stray caches)."""
    listed = subprocess.run(["git", "ls-files", PACKAGE], cwd=REPO, capture_output=True, text=True, check=True)
    return {line for line in listed.stdout.splitlines() if line}


def main(dist: Path) -> int:
    expected = source_files()
    wheels, sdists = sorted(dist.glob("*.whl")), sorted(dist.glob("*.tar.gz"))
    if len(wheels) != 1 or len(sdists) != 1:
        print(f"expected one wheel and one sdist in {dist}, found {wheels + sdists}")
        return 1
    with zipfile.ZipFile(wheels[0]) as wheel:
        in_wheel = {name for name in wheel.namelist() if not name.split("/", 1)[0].endswith(".dist-info")}
    with tarfile.open(sdists[0]) as sdist:
        in_sdist = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    problems = [f"wheel lacks {name}" for name in sorted(expected - in_wheel)]
    problems += [f"wheel holds {name}, which is not in the package source" for name in sorted(in_wheel - expected)]
    problems += [f"sdist lacks {name}" for name in sorted(expected - in_sdist)]
    for name in ("py.typed", "testing/checkpoints/tiny_clip/model.safetensors", "hub_cards/rlp.md"):
        if f"{PACKAGE}/{name}" not in in_wheel:
            problems.append(f"wheel lacks {PACKAGE}/{name}")
    print("\n".join(problems) or f"{wheels[0].name}: {len(in_wheel)} files = the package source tree; "
          f"{sdists[0].name} holds them too")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
