"""The examples run as documented (short settings), so they cannot rot."""

import os
import subprocess
import sys
from pathlib import Path

from peft_effadapt.testing import load_tiny_clip

REPO = Path(__file__).resolve().parents[1]


def run_example(tmp_path, *args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=600,
                            env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def test_main_job_rlp_clip(tmp_path):
    out = run_example(tmp_path, REPO / "examples/rlp_clip.py", "--steps", "20", "--output-dir", tmp_path)
    rows = {line[:15].strip(): line for line in out.splitlines() if " HM " in line}
    assert set(rows) == {"zero-shot CLIP", "RLP trained", "RLP reloaded"}
    assert rows["RLP trained"][15:] == rows["RLP reloaded"][15:]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def test_pyra_example(tmp_path):
    out = run_example(tmp_path, REPO / "examples/pyra_vit.py", "--tiny", "--epochs", "1")
    assert "reloaded adapter accuracy" in out and "deployed accuracy" in out


def test_qprompt_example_reloads_the_deployed_prompt(tmp_path):
    out = run_example(tmp_path, REPO / "examples/qprompt_clip.py", "--steps", "20", "--output-dir", tmp_path)
    rows = {line[:16].strip(): line[16:] for line in out.splitlines() if " HM " in line}
    assert len(rows) == 3, out
    trained, reloaded = list(rows.values())[1:]
    assert trained == reloaded  # the stored packed indices + codebook rebuild exactly the evaluated prompt
    width = load_tiny_clip()[0].config.text_config.hidden_size
    payload = 4 * width // 8 + 2 * 2  # 1 bit per context value (4 tokens) + a 2-entry fp16 codebook
    assert f"{payload} bytes of tensors" in out
