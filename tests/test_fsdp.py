"""Adapters train under FSDP2 (`fully_shard`, 2 CPU processes on gloo) to the same tensors as one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("case_id", ["consolidator-vit-cls", "rlp-clip", "pyra-vit-cls"])
def test_fsdp2_two_processes_match_one(case_id, tmp_path):
    out = tmp_path / "fsdp.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(ROOT / "tests" / "fsdp_train.py"), case_id, str(out)], check=True, env=env,
                   cwd=ROOT, timeout=900)
    result = json.loads(out.read_text())
    assert result["exit_codes"] == [0, 0]
    assert result["sharded_params"] > 0  # the parameters really are DTensors
    assert result["rows"]
    # training moved most trained tensors (some have an exactly zero gradient: a key bias, or the last layer's PYRA
    # modulation, which only reaches tokens the CLS-pooled loss never reads)
    assert sum(row["moved"] > 0 for row in result["rows"].values()) >= len(result["rows"]) / 2
    for name, row in result["rows"].items():
        # fp32: the gradient of a half-batch mean, averaged over 2 ranks by reduce-scatter, vs the whole-batch mean
        assert row["max_abs_diff"] <= 1e-5 * max(1.0, row["max_abs"]), (name, row)
