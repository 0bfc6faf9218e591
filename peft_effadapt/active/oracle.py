"""Oracles answer label queries: a dataset label column (simulation) or any callable (a person labelling)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from datasets import Dataset


class DatasetOracle:
    """Reads the labels of queried rows from `label_column` of the original pool (simulated annotator).

    The training views of the pool never carry this column; only the oracle holds it.
    """

    def __init__(self, dataset: Dataset, label_column: str = "label"):
        if label_column not in dataset.column_names:
            raise ValueError(f"the pool has no label column {label_column!r} for the oracle (columns: "
                             f"{dataset.column_names}); pass oracle=callable(ids) -> labels to label by hand.")
        self.labels = dataset[label_column]

    def __call__(self, pool_ids: Sequence[int]) -> list[int]:
        return [int(self.labels[int(i)]) for i in pool_ids]


def ask(oracle: Callable[[list[int]], Sequence[int]], pool_ids: list[int], num_classes: int) -> list[int]:
    """Calls the oracle once for `pool_ids` and checks its answer (one int label in [0, C) per id)."""
    answer = list(oracle(list(pool_ids))) if pool_ids else []
    if len(answer) != len(pool_ids):
        raise ValueError(f"the oracle returned {len(answer)} labels for {len(pool_ids)} queried samples.")
    labels = []
    for pid, label in zip(pool_ids, answer):
        if isinstance(label, bool) or int(label) != label or not 0 <= int(label) < num_classes:
            raise ValueError(f"the oracle's label {label!r} for pool id {pid} is not a class index in "
                             f"[0, {num_classes}).")
        labels.append(int(label))
    return labels
