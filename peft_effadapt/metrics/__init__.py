"""The project's metrics as `evaluate` metric modules shipped inside the package (no Hub needed).

    import evaluate
    from peft_effadapt.metrics import metric_path

    metric = evaluate.load(metric_path("base_to_novel"))
    metric.compute(predictions=[0, 1, 1], references=[0, 1, 0], novel=[False, False, True])
    # {'base': 100.0, 'novel': 0.0, 'hm': 0.0}

Modules: `top1_accuracy` (accuracy in %), `base_to_novel` (CoOp protocol: base / novel accuracy and their harmonic
mean, in %), `text_video_retrieval` (R@1/5/10 in %, MdR, MnR and R-Sum, text->video and video->text).
"""

from __future__ import annotations

import functools
from pathlib import Path

METRICS = ("top1_accuracy", "base_to_novel", "text_video_retrieval")


def metric_path(name: str) -> str:
    """Path of the metric script, for `evaluate.load(path)`."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; expected one of {METRICS}.")
    return str(Path(__file__).parent / name / f"{name}.py")


@functools.cache
def load_metric(name: str):
    """`evaluate.load(metric_path(name), keep_in_memory=True)`, loaded once per process."""
    import evaluate

    return evaluate.load(metric_path(name), keep_in_memory=True)


__all__ = ["METRICS", "load_metric", "metric_path"]
