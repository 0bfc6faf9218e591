"""Wall and CPU time of the commands the README and docs quote a runtime for.

usage: python benchmarks/runtimes.py [--only main_job help quick_start ...] [--repeats 1]
Writes benchmarks/results/runtimes.json (merging with the entries already there) and prints one line per command.

Each command runs in a fresh process from the repository root with OMP_NUM_THREADS=1 and HF_HUB_OFFLINE=1, as a
user would run it. Wall time depends on what else the machine runs, so every entry also records the child's CPU time
(user + sys), the machine's core count and the 1-minute load average before and after: on a shared machine, quote
the CPU time next to the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "runtimes.json"
# the README's Quick start block, extracted and run in a temporary folder (as tests/test_readme.py does)
QUICK_START = ("import os, re, tempfile; text = open('README.md').read(); "
               "code = re.search(r'```python\\n(.*?)```', text.split('## Quick start', 1)[1], re.S).group(1); "
               "folder = tempfile.TemporaryDirectory(); os.chdir(folder.name); exec(code)")
EXAMPLES = sorted(p.name for p in (REPO / "examples").glob("*.py"))

COMMANDS: dict[str, list[str]] = {
    "main_job": ["examples/rlp_clip.py"],
    "quick_start": ["-c", QUICK_START],
    "qprompt_clip": ["examples/qprompt_clip.py"],
    "pyra_vit_tiny": ["examples/pyra_vit.py", "--tiny"],
    "tempme_retrieval": ["examples/tempme_retrieval.py"],
    "consolidator_vit_tiny": ["examples/consolidator_vit.py", "--tiny", "--output-dir", "{tmp}/consolidator"],
    "csgd_resnet": ["examples/csgd_resnet.py", "--output-dir", "{tmp}/csgd"],
    "resrep_resnet": ["examples/resrep_resnet.py"],
    "lftl_adapt": ["examples/lftl_adapt.py"],
    **{f"help:{name}": [f"examples/{name}", "--help"] for name in EXAMPLES},
}
GROUPS = {"help": [k for k in COMMANDS if k.startswith("help:")]}


def measure(args: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, *(a.replace("{tmp}", tmp) for a in args)]
        load_before = os.getloadavg()[0]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{result.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"command": "python " + " ".join(args), "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", default=["main_job", "quick_start", "help"],
                        help=f"commands or groups: {', '.join([*GROUPS, *COMMANDS])}")
    args = parser.parse_args()
    names = [n for item in args.only for n in GROUPS.get(item, [item])]
    unknown = [n for n in names if n not in COMMANDS]
    if unknown:
        parser.error(f"unknown commands {unknown}")
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data["machine"] = {"cpu_cores": os.cpu_count(), "platform": platform.platform(),
                       "python": platform.python_version(), "threads": "OMP_NUM_THREADS=1", "note": "a 2-core machine shared with other jobs; load = "
                       "1-minute load average before/after each command"}
    entries = data.setdefault("commands", {})
    for name in names:
        entries[name] = {**measure(COMMANDS[name]), "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        print(f"{name:26s} wall {entries[name]['wall_s']:7.2f} s  cpu {entries[name]['cpu_s']:7.2f} s  "
              f"load {entries[name]['load_before']:.1f} -> {entries[name]['load_after']:.1f}", flush=True)
    data["command"] = "python benchmarks/runtimes.py --only " + " ".join(args.only)
    RESULTS.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
