"""`CSGDConfig`: the options of `CentripetalSGDCallback`."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import PruningConfig, check_number
from .clusters import CLUSTER_METHODS


@dataclass
class CSGDConfig(PruningConfig):
    """Centripetal SGD options, validated on construction (`ValueError` naming the field).

    The shared options of C-SGD and ResRep follow the C-SGD ones below; `groups` defaults to "all": C-SGD prunes
    residual streams too, several producers sharing the pacesetter's clustering.

    Args:
        keep_ratio: Kept channels per group: a float in (0, 1] for every selected group, or a dict `{glob on group
            name: float ratio | int width}` (groups that no pattern matches are left alone). 5/8 is the paper's CIFAR
            setting; `widths_for_flops` gives widths for a FLOPs target.
        centripetal_strength: eps, in the code's lr-scaled convention (CIFAR 3e-3, ImageNet ResNet-50 0.05).
        vector_strength_ratio: eps multiplier for conv/linear biases and BN gamma/beta (0.1).
        weight_decay: eta for kernels, applied inside the edit (1e-4).
        vector_weight_decay: eta for vectors (biases, BN parameters), inside the edit (0).
        cluster_method: "kmeans" (on the pacesetter's kernel rows), "even" or "biased".
        kmeans_seed: Seed of k-means (computed on rank 0, broadcast to all ranks).
        kmeans_n_init: Restarts of k-means.
    """

    keep_ratio: float | dict = 0.625
    centripetal_strength: float = 3e-3
    vector_strength_ratio: float = 0.1
    weight_decay: float = 1e-4
    vector_weight_decay: float = 0.0
    cluster_method: str = "kmeans"
    kmeans_seed: int = 0
    kmeans_n_init: int = 10

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.keep_ratio, dict):
            for pattern, value in self.keep_ratio.items():
                _check_keep(value, f"keep_ratio[{pattern!r}]")
        else:
            _check_keep(self.keep_ratio, "keep_ratio")
            if isinstance(self.keep_ratio, int):
                raise ValueError("a single keep_ratio must be a float in (0, 1]; give absolute widths per group as a "
                                 "dict {group name pattern: width}")
        if self.cluster_method not in CLUSTER_METHODS:
            raise ValueError(f"cluster_method must be one of {CLUSTER_METHODS}, got {self.cluster_method!r}")
        for name in ("centripetal_strength", "vector_strength_ratio", "weight_decay", "vector_weight_decay"):
            check_number(name, getattr(self, name), low=0.0)
            setattr(self, name, float(getattr(self, name)))
        check_number("kmeans_seed", self.kmeans_seed, integer=True)
        check_number("kmeans_n_init", self.kmeans_n_init, low=1, integer=True)


def _check_keep(value, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a float ratio in (0, 1] or an int width, got {value!r}")
    if isinstance(value, float) and not 0 < value <= 1:
        raise ValueError(f"{what} must be in (0, 1], got {value}")
    if isinstance(value, int) and value < 1:
        raise ValueError(f"{what} must be a positive width, got {value}")
