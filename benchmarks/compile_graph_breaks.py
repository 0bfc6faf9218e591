"""torch.compile over every PEFT type of the conformance cases: graphs, graph breaks and their reasons for the
inference forward (eval, no_grad), two training steps (forward, backward, SGD update) and the merged model, counted
by tests/compile_check.py (the helper tests/test_compile.py asserts this table with). With `--inductor`, the cases
of tests/test_compile.py also run through inductor: first-call wall time (compilation included) and the largest
absolute difference from eager (outputs; losses, first-step gradients and updated parameters).

    python benchmarks/compile_graph_breaks.py [--inductor] [--cases ID ...]
        -> results/compile_graph_breaks.json (+ a table printed); --cases re-measures those cases, keeps the others
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_result  # noqa: E402
from compile_check import MODES, PER_TYPE, count_graphs, max_abs_difference, run_mode  # noqa: E402
from method_cases import CASES  # noqa: E402

RESULT = RESULTS / "compile_graph_breaks.json"


def modes(case) -> list[str]:
    return [m for m in MODES if m != "merged" or case.mergeable]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inductor", action="store_true", help="also time inductor and compare it with eager")
    parser.add_argument("--cases", nargs="+", help="case ids to re-measure; the other rows are kept from the file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    old = json.loads(RESULT.read_text()) if args.cases and RESULT.exists() else {}
    chosen = [c for c in CASES if not args.cases or c.id in args.cases]
    rows = {**old.get("rows", {}), **{case.id: {mode: count_graphs(case, mode) for mode in modes(case)}
                                      for case in chosen}}
    rows = {case.id: rows[case.id] for case in CASES}
    inductor = dict(old.get("inductor", {}))
    if args.inductor:
        for case in (c for c in chosen if c.id in PER_TYPE):
            inductor[case.id] = {}
            for mode in modes(case):
                eager, compiled = run_mode(case, mode)
                inductor[case.id][mode] = {"first_call_s": round(compiled.first_call_s, 1),
                                           "max_abs_diff": max_abs_difference(eager, compiled.value),
                                           **compiled.counts()}
                print(case.id, mode, inductor[case.id][mode], flush=True)
    print("| case | " + " | ".join(f"{m} graphs / breaks" for m in MODES) + " | reasons |")
    print("|---|---|---|---|---|")
    for cid, r in rows.items():
        cells = [f"{r[m]['graphs']} / {r[m]['graph_breaks']}" if m in r else "-" for m in MODES]
        reasons = "; ".join(sorted({x for m in r for x in r[m]["reasons"]}))
        print(f"| {cid} | " + " | ".join(cells) + f" | {reasons} |")
    payload = {"torch": torch.__version__, "rows": rows}
    if inductor:
        payload["inductor"] = inductor
    write_result("compile_graph_breaks", payload)


if __name__ == "__main__":
    main()
