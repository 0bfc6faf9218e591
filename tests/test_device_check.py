"""The device check (benchmarks/device_check.py): its schedule and compiled path, the GPU table, and (slow) the whole
check at tiny sizes on CPU, so the GPU script never rots."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import device_check  # noqa: E402
import device_speed  # noqa: E402
import device_table  # noqa: E402

CORRECTNESS = {f"correctness/{m}" for m in ("consolidator", "tome", "pyra", "coop", "rlp", "qprompt-coop", "qprompt-rlp",
                                             "qprompt-maple", "tempme", "resrep", "csgd")}


def test_schedule_puts_merging_then_pruning_then_tempme_first_and_every_section_in():
    sizes = dict(device_check.REAL)
    names = [s[0] for s in device_check.schedule("cuda", sizes, False, list(device_speed.MODES), 20.0)]
    assert len(names) == len(set(names))
    cases = [n.split("/")[1] for n in names if n.startswith("speed/")]
    assert cases[:cases.index("pruning")] == ["token_merging"] * 4  # eager and reduce-overhead, batch 64 and 256
    assert cases.index("pruning") < cases.index("tempme") < cases.index("consolidator") < cases.index("prompts")
    assert names.index("speed/tempme/reduce-overhead/b16") < names.index("correctness/qprompt-coop") < \
        names.index("speed/consolidator/eager/b64")  # the QPrompt device fix before the rest
    for case in device_speed.CASES:
        for mode in device_speed.MODES:
            assert any(n.startswith(f"speed/{case}/{mode}/") for n in names), (case, mode)
    assert CORRECTNESS | {"train/tempme", "train/prompts"} <= set(names)
    eager_only = device_check.schedule("cuda", sizes, False, ["eager"], 20.0)
    assert not any("reduce-overhead" in s[0] or "default" in s[0] for s in eager_only)


def test_compile_estimates_follow_the_model_table():
    least, full = device_speed.compile_units("token_merging")
    assert least == 1.0 + 2.5 and full == 1.0 + 2.5 + 3.0  # the ViT, ToMe, merged PYRA; unmerged PYRA is extra
    assert device_speed.compile_units("token_merging", extra=True) == (1.0 + 3.5, 1.0 + 3.5)
    assert device_speed.timed_in("pruning", "eager", False) == ["dense", "slimmed_aligned", "resrep_internal"]
    assert device_speed.timed_in("pruning", "reduce-overhead", True) == ["dense", "resrep_internal"]
    assert "qprompt-coop" not in device_speed.timed_in("prompts", "default", False)  # graph breaks: eager only


@pytest.mark.parametrize("mode", ["reduce-overhead", "default"])
def test_compiled_modes_go_through_compile_for_inference(monkeypatch, mode):
    import peft_effadapt

    calls = []
    monkeypatch.setattr(peft_effadapt, "compile_for_inference", lambda model, **kw: calls.append(kw) or model)
    monkeypatch.setitem(device_speed.SETTINGS, "backend", "inductor")
    model = torch.nn.Linear(2, 2).train()
    assert device_speed.compiled(model, mode) is model and calls == [{"mode": mode}]
    assert device_speed.compiled(model, "eager") is model and not model.training and len(calls) == 1


def test_table_names_the_device_and_gives_each_ratio_in_its_mode_and_batch():
    row = {"per_s": 1.0, "s": 1.0}
    payload = {
        "cuda_device": "NVIDIA H100 80GB HBM3", "command": "python benchmarks/device_check.py", "elapsed_s": 400,
        "versions": {"torch": "2.11", "cuda": "13.0", "transformers": "5.25", "peft": "0.21.2"},
        "sections": {
            "speed/token_merging/eager/b64": {"reference": "vit", "results": {
                "vit": {**row, "speedup": 1.0}, "tome": {**row, "speedup": 0.5}}},
            "speed/token_merging/reduce-overhead/b64": {"reference": "vit", "results": {
                "vit": {**row, "speedup": 1.0}, "tome": {**row, "speedup": 1.71}}},
            "speed/token_merging/reduce-overhead/b256": {"skipped": "time budget"},
            "speed/pruning/reduce-overhead/b256": {"reference": "dense", "settings": {"flops_ratio": {
                "slimmed_aligned": 0.4912}}, "results": {"dense": {**row, "speedup": 1.0},
                                                           "slimmed_aligned": {**row, "speedup": 1.83}}},
            "correctness/coop": {"ok": True},
        },
    }
    table = device_table.markdown(payload)
    assert "**NVIDIA H100 80GB HBM3**" in table and "CUDA 13.0" in table
    lines = table.splitlines()
    assert lines[2] == ("| case (vs the unmodified model, same mode) | eager b64 | reduce-overhead b64 | "
                        "reduce-overhead b256 |")
    assert lines[4] == "| ToMe r=16 vs ViT-B/16 | 0.50x | 1.71x | skipped |"
    assert lines[5].startswith("| ResNet-50 slimmed") and "(0.491 FLOPs)" in lines[5]
    assert lines[5].endswith("| - | - | 1.83x |")


@pytest.mark.slow
def test_device_check_small_cpu(tmp_path):
    """Every section at tiny sizes: correctness, eager and compiled speed (aot_eager: the fullgraph capture of every
    speed model without inductor's minutes of C++ compilation; inductor is tests/test_compile.py's), training steps;
    then the table."""
    out = tmp_path / "device.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "device_check.py"), "--device", "cpu", "--small",
           "--budget-s", "100000", "--compile-backend", "aot_eager", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, timeout=3000)
    result = json.loads(out.read_text())
    for key in ("device_name", "versions", "sizes", "tolerances", "compile"):
        assert key in result
    assert result["versions"]["peft"] and result["versions"]["transformers"]
    sections = result["sections"]
    planned = [s[0] for s in device_check.schedule("cpu", result["sizes"], True, list(device_speed.MODES), 0.0)]
    assert list(sections) == planned
    for name, entry in sections.items():
        assert "error" not in entry, (name, entry.get("traceback"))
        assert "skipped" not in entry, name
        checks = {k: v for k, v in entry.items() if isinstance(v, dict) and "ok" in v}
        failed = {k: v for k, v in checks.items() if not v["ok"]}
        assert not failed, (name, failed)
        if name in CORRECTNESS - {"correctness/resrep", "correctness/csgd"}:
            assert checks and entry["train_finite"], name
        if name.startswith("speed/"):
            case, mode = name.split("/")[1:3]
            extra = name.endswith("/extra")
            assert list(entry["results"]) == device_speed.timed_in(case, mode, extra), name
            assert all(r["s"] > 0 and r["speedup"] > 0 for r in entry["results"].values()), name
            if mode != "eager":  # fullgraph: no break; the repeated calls compile nothing new
                assert entry["recompiles"] == 0, name
                assert all(r["graphs"] >= 1 for r in entry["results"].values()), name
    assert sections["speed/pruning/eager/b8"]["settings"]["flops_ratio"]["slimmed_aligned"] <= 0.5
    assert sections["train/tempme"]["results"]["meanP"]["step_s"] > 0
    table = device_table.markdown(result)
    assert "ToMe" in table and "TempMe" in table and "skipped" not in table
