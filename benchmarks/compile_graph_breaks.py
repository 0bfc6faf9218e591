"""torch._dynamo.explain over every PEFT type of the conformance cases: graphs, graph breaks and their reasons, for
the inference forward (eval, no_grad) and the training forward (train mode, loss.backward outside the trace).

    python benchmarks/compile_graph_breaks.py   -> results/compile_graph_breaks.json (+ a markdown table printed)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from peft import get_peft_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402
from method_cases import CASES  # noqa: E402


def explain(case, training: bool) -> dict:
    torch.manual_seed(0)
    model = get_peft_model(case.make_model(), case.make_config(init_weights=False))
    model.train(training)
    inputs = case.make_inputs()

    def fn(**kw):
        return case.output(model(**kw))

    torch._dynamo.reset()
    with torch.set_grad_enabled(training):
        out = torch._dynamo.explain(fn)(**inputs)
    reasons = sorted({str(b.reason).splitlines()[0][:160] for b in out.break_reasons})
    return {"graphs": out.graph_count, "graph_breaks": out.graph_break_count, "reasons": reasons}


def main():
    torch.set_num_threads(1)
    rows = {}
    for case in CASES:
        rows[case.id] = {}
        for mode in ("inference", "training"):
            try:
                rows[case.id][mode] = explain(case, mode == "training")
            except Exception as err:  # noqa: BLE001
                rows[case.id][mode] = {"error": f"{type(err).__name__}: {err}"[:300]}
            print(case.id, mode, rows[case.id][mode], flush=True)
    print("| case | inference graphs / breaks | training graphs / breaks | reasons |")
    print("|---|---|---|---|")
    for cid, r in rows.items():
        cells = [f"{r[m].get('graphs', '-')} / {r[m].get('graph_breaks', r[m].get('error', '-'))}"
                 for m in ("inference", "training")]
        reasons = "; ".join(sorted(set(r["inference"].get("reasons", []) + r["training"].get("reasons", []))))
        print(f"| {cid} | {cells[0]} | {cells[1]} | {reasons} |")
    write_result("compile_graph_breaks", {"torch": torch.__version__, "rows": rows})


if __name__ == "__main__":
    main()
