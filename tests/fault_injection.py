"""Kill-and-resume harness for fault tests: run a Python script in a subprocess, wait until it reports progress (a
file appears), stop it with a signal, rerun it in resume mode, and compare the final results.

Typical use (see `tests/test_faults.py`)::

    reference = start(script, [out_a, "fresh"])                 # the uninterrupted run, in parallel
    victim = start(script, [out_b, "fresh"])
    kill_when(victim, out_b / "saved-4")                        # SIGKILL once the first checkpoint is complete
    finish(start(script, [out_b, "resume"]))                    # resume from the last checkpoint
    finish(reference)
    assert_same_tensors(out_a / "final", out_b / "final", atol=1e-6)

Scripts signal progress by creating marker files (e.g. from a `TrainerCallback.on_save`, which runs after a
checkpoint is complete), so the kill never lands on a half-written checkpoint by accident — tests that want that
can wait on another file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Run:
    """A started script: its process and the files its stdout and stderr go to."""

    process: subprocess.Popen
    log: Path
    killed_with: int | None = None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def start(script: str | Path, args: list[str | Path], log: str | Path | None = None, env: dict | None = None) -> Run:
    """Starts ``python script *args`` from the repository root with one CPU thread and offline Hub access."""
    log = Path(log) if log is not None else Path(str(args[0]) + ".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                   "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **(env or {})}
    handle = log.open("w")
    process = subprocess.Popen([sys.executable, str(script), *map(str, args)], cwd=REPO, env=environment,
                               stdout=handle, stderr=subprocess.STDOUT)
    handle.close()
    return Run(process, log)


def wait_for(run: Run, marker: str | Path, timeout: float = 120.0, poll: float = 0.02) -> Path:
    """Waits until `marker` (a path, or a glob pattern relative to '/') exists; raises if the run ends first."""
    marker = Path(marker)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hits = [marker] if marker.exists() else sorted(Path("/").glob(str(marker).lstrip("/")))
        if hits:
            return hits[0]
        if run.process.poll() is not None:
            raise AssertionError(f"the run ended (exit {run.process.returncode}) before {marker} appeared:\n"
                                 f"{run.output()[-3000:]}")
        time.sleep(poll)
    run.process.kill()
    raise AssertionError(f"{marker} did not appear within {timeout} s:\n{run.output()[-3000:]}")


def kill_when(run: Run, marker: str | Path, sig: int = signal.SIGKILL, timeout: float = 120.0) -> Path:
    """Sends `sig` (default SIGKILL: no cleanup, no atexit handlers) as soon as `marker` exists; returns the marker
    path. Asserts that the process was really stopped by the signal, not finished on its own."""
    hit = wait_for(run, marker, timeout)
    run.process.send_signal(sig)
    run.process.wait(timeout=30)
    run.killed_with = sig
    assert run.process.returncode == -sig, (
        f"the run was not stopped by signal {sig} (exit {run.process.returncode}): it finished before the kill\n"
        f"{run.output()[-2000:]}")
    return hit


def finish(run: Run, timeout: float = 300.0) -> Run:
    """Waits for a run to complete and asserts that it succeeded."""
    try:
        run.process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        run.process.kill()
        raise AssertionError(f"the run did not finish within {timeout} s:\n{run.output()[-3000:]}") from None
    assert run.process.returncode == 0, f"the run failed (exit {run.process.returncode}):\n{run.output()[-3000:]}"
    return run


def assert_same_tensors(a: str | Path, b: str | Path, atol: float = 1e-6) -> int:
    """Every tensor of the safetensors files `a` and `b` (or of `adapter_model.safetensors` in two folders) is equal
    within `atol`; returns the number of values compared."""
    a, b = (Path(p) / "adapter_model.safetensors" if Path(p).is_dir() else Path(p) for p in (a, b))
    first, second = load_file(a), load_file(b)
    assert set(first) == set(second), sorted(set(first) ^ set(second))
    for key in first:
        torch.testing.assert_close(second[key], first[key], rtol=0, atol=atol, msg=key)
    return sum(t.numel() for t in first.values())
