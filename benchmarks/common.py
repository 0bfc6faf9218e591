"""Shared helpers of the benchmark scripts: timing by median of repeats, result files that name their machine."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def speed_arguments(doc: str, threads: int = 2, batch: int = 8, repeats: int = 5) -> argparse.ArgumentParser:
    """The parser of a speed benchmark with the arguments they all take: --threads, --batch, --repeats."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=threads)
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--repeats", type=int, default=repeats)
    return parser


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2,
                        device: str | torch.device = "cpu",
                        clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds of each function, timed in rounds that run every function once, so drift hits all alike
    (on CUDA: CUDA events around each call, which wait for the GPU; on CPU: `clock`, wall time by default —
    `time.process_time` counts only this process's CPU time, which other processes on a loaded machine disturb far
    less)."""
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    if cuda:
        torch.cuda.synchronize()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end) / 1000)
            else:
                start = clock()
                fn()
                times[name].append(clock() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def inference(model: Callable, *, context: Callable[[], contextlib.AbstractContextManager] | None = None,
              before: Callable[[], object] | None = None, **inputs) -> Callable[[], None]:
    """A no-grad forward of `model` on `inputs` (inside `context()`, e.g. autocast; after `before()`, e.g. CUDA
    graphs' step marker), as a timing function."""

    def run():
        if before is not None:
            before()
        with torch.no_grad(), (context() if context is not None else contextlib.nullcontext()):
            model(**inputs)

    return run


def training_step(loss: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer, *,
                  context: Callable[[], contextlib.AbstractContextManager] | None = None) -> Callable[[], None]:
    """One optimizer step on `loss()` (computed inside `context()`, e.g. autocast), as a timing function."""

    def step():
        with context() if context is not None else contextlib.nullcontext():
            value = loss()
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def top1(model: torch.nn.Module, test: tuple[torch.Tensor, torch.Tensor], batch: int = 256) -> float:
    """Top-1 accuracy of an image classifier (eval mode) on `test` = (pixel values, labels), `batch` at a time."""
    model.eval()
    with torch.no_grad():
        preds = torch.cat([model(pixel_values=test[0][i:i + batch]).logits.argmax(-1)
                           for i in range(0, len(test[1]), batch)])
    return float((preds == test[1]).float().mean())


def machine() -> dict:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or platform.machine()
    return {
        "device": device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"command": "python " + " ".join(sys.argv), "machine": machine(), **payload}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps(payload, indent=2))
    print(f"wrote {path}")
    return path
