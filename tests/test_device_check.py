"""The device check (benchmarks/device_check.py) at tiny sizes on CPU, so the GPU script never rots."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("compile_", [False, True], ids=["eager", "compile"])
def test_device_check_small_cpu(tmp_path, compile_):
    out = tmp_path / "device.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "device_check.py"), "--device", "cpu", "--small",
           "--budget-s", "100000", "--out", str(out)]
    if not compile_:
        cmd.append("--no-compile")
    else:
        cmd += ["--only", "speed_compiled", "--compile-backend", "aot_eager"]  # inductor on CPU: tests/test_compile.py
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, timeout=3000)
    result = json.loads(out.read_text())
    for key in ("device_name", "versions", "sizes", "tolerances"):
        assert key in result
    assert result["versions"]["peft"] and result["versions"]["transformers"]
    sections = result["sections"]
    expected = {"speed_compiled/token_merging", "speed_compiled/tempme", "speed_compiled/consolidator",
                "speed_compiled/prompts", "speed_compiled/pruning"} if compile_ else {
        f"correctness/{m}" for m in ("consolidator", "tome", "pyra", "coop", "rlp", "qprompt-coop", "qprompt-rlp",
                                     "qprompt-maple", "tempme", "resrep", "csgd")}
    assert expected <= set(sections)
    for name, entry in sections.items():
        assert "error" not in entry, (name, entry.get("traceback"))
        assert "skipped" not in entry, name
        checks = {k: v for k, v in entry.items() if isinstance(v, dict) and "ok" in v}
        failed = {k: v for k, v in checks.items() if not v["ok"]}
        assert not failed, (name, failed)
        if name.startswith("correctness/") and name not in ("correctness/resrep", "correctness/csgd"):
            assert checks, name
            assert entry["train_finite"], name
    if not compile_:
        speed = sections["speed_eager/tempme"]["eager"]["train_full_ft"]
        assert speed["meanP"]["step_s"] > 0 and speed["tempme"]["step_s"] > 0
