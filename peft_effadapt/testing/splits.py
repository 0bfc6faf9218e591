"""CoOp-protocol helpers: k-shot sampling per class and base/novel class halves."""

from __future__ import annotations

import numpy as np
from datasets import ClassLabel, Dataset

from .data import class_names
from .quiet import no_progress_bars


def few_shot_split(dataset: Dataset, shots: int = 16, seed: int = 0, label_column: str = "label") -> Dataset:
    """Exactly `shots` rows per class, drawn without replacement; deterministic given `seed`."""
    names = class_names(dataset, label_column)
    if not isinstance(shots, (int, np.integer)) or shots < 1:
        raise ValueError(f"shots must be a positive integer, got {shots!r}")
    labels = np.asarray(dataset[label_column])
    rng = np.random.default_rng(seed)
    picked = []
    for c, name in enumerate(names):
        idx = np.flatnonzero(labels == c)
        if len(idx) < shots:
            raise ValueError(f"few_shot_split: class {c} ({name!r}) has {len(idx)} images, fewer than shots={shots}")
        picked.append(rng.choice(idx, size=shots, replace=False))
    return dataset.select(np.sort(np.concatenate(picked)).tolist())


def base_novel_split(dataset: Dataset, label_column: str = "label") -> tuple[Dataset, Dataset]:
    """Classes split in halves: base = first ceil(C/2) classes, novel = the rest relabelled from 0 (CoOp protocol).
    Each half keeps only its rows and gets a ClassLabel with its own class names."""
    names = class_names(dataset, label_column)
    if len(names) < 2:
        raise ValueError(f"base_novel_split needs at least 2 classes, found {len(names)}")
    n_base = (len(names) + 1) // 2
    return _subset(dataset, names, range(n_base), label_column), \
        _subset(dataset, names, range(n_base, len(names)), label_column)


def _subset(dataset: Dataset, names: list[str], keep: range, label_column: str) -> Dataset:
    labels = np.asarray(dataset[label_column])
    rows = np.flatnonzero((labels >= keep.start) & (labels < keep.stop)).tolist()
    part = dataset.select(rows)
    new_labels = (labels[rows] - keep.start).tolist()
    position = part.column_names.index(label_column)
    with no_progress_bars():  # add_column flattens the selection's index mapping with a bar per split
        part = part.remove_columns(label_column).add_column(
            label_column, new_labels, feature=ClassLabel(names=[names[i] for i in keep]))
    order = part.column_names[:-1]
    order.insert(position, label_column)
    return part.select_columns(order)
