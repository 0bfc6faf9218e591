"""Accuracy metrics of each round, computed directly (`evaluate.load` needs the Hub, which may be unreachable)."""

from __future__ import annotations

import numpy as np


def classification_metrics(predictions, labels, num_classes: int) -> dict[str, float]:
    """Overall accuracy and mean per-class accuracy (the VisDA-C convention) over the classes present."""
    pred, true = np.asarray(predictions).ravel(), np.asarray(labels).ravel()
    if pred.shape != true.shape:
        raise ValueError(f"{pred.size} predictions for {true.size} labels.")
    if true.size == 0:
        return {"accuracy": float("nan"), "mean_class_accuracy": float("nan")}
    per_class = [float((pred[true == c] == c).mean()) for c in range(num_classes) if (true == c).any()]
    return {"accuracy": float((pred == true).mean()), "mean_class_accuracy": float(np.mean(per_class))}
