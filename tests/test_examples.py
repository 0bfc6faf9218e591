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


def test_main_job_rlp_clip_is_quiet_and_leaves_nothing_behind(tmp_path):
    """The README's first command: one table, a verdict, an exact reload, no warnings, no files left."""
    scratch, cwd = tmp_path / "tmp", tmp_path / "cwd"
    scratch.mkdir()
    cwd.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TMPDIR": str(scratch),
           "PYTHONWARNINGS": "error"}
    result = subprocess.run([sys.executable, str(REPO / "examples/rlp_clip.py"), "--steps", "20"],
                            capture_output=True, text=True, timeout=600, env=env, cwd=cwd)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stderr == ""  # no warnings, progress bars or load reports
    table = {line[:15].strip(): line[15:].split() for line in result.stdout.splitlines()
             if line.startswith(("zero-shot CLIP ", "CoOp ", "RLP r=1 "))}
    assert set(table) == {"zero-shot CLIP", "CoOp", "RLP r=1"}, result.stdout
    width = load_tiny_clip()[0].config.text_config.hidden_size
    assert table["RLP r=1"][0] == str(4 + width) and table["CoOp"][0] == str(4 * width)  # trained numbers
    assert "reloaded RLP adapter: identical scores" in result.stdout
    assert any(line.startswith("Reading: RLP ") for line in result.stdout.splitlines())
    assert list(scratch.iterdir()) == [] and list(cwd.iterdir()) == []


def test_main_job_keeps_adapters_in_output_dir(tmp_path):
    out = run_example(tmp_path, REPO / "examples/rlp_clip.py", "--steps", "2", "--output-dir", tmp_path / "out")
    assert f"adapters saved in {tmp_path / 'out'}/rlp" in out
    for name in ("rlp", "coop"):
        assert (tmp_path / "out" / name / "adapter_model.safetensors").exists()


def test_help_answers_before_heavy_imports():
    """`--help` of every example parses its arguments before importing torch & co, so it answers at once."""
    heavy = ("torch", "transformers", "peft", "datasets", "peft_effadapt")
    probe = ("import runpy, sys\n"
             "sys.argv = [sys.argv[1], '--help']\n"
             "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
             "except SystemExit as stop:\n    assert stop.code in (0, None), stop.code\n"
             f"print(sorted(m for m in {heavy!r} if m in sys.modules))")
    for script in sorted((REPO / "examples").glob("*.py")):
        result = subprocess.run([sys.executable, "-c", probe, str(script)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, (script.name, result.stderr[-2000:])
        assert "usage:" in result.stdout, script.name
        assert result.stdout.strip().splitlines()[-1] == "[]", (script.name, result.stdout[-300:])


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
