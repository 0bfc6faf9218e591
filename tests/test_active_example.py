"""examples/lftl_adapt.py runs as documented (short settings) and a rerun on the same folder resumes, not repeats."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_example(tmp_path, *args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(REPO / "examples/lftl_adapt.py"), *map(str, args)],
                            capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def test_lftl_example_lora_and_resume(tmp_path):
    args = ("--rounds", "2", "--pool-per-class", "16", "--epochs", "1", "--ratio", "0.03", "--lora", "4",
            "--output-dir", tmp_path / "run")
    first = run_example(tmp_path, *args)
    table = first[first.index("round labelled"):]
    assert len(table.strip().splitlines()) == 4  # header + rounds 0, 1, 2
    assert (tmp_path / "run" / "round_002" / "adapter" / "adapter_model.safetensors").is_file()
    second = run_example(tmp_path, *args)
    assert second[second.index("round labelled"):] == table
