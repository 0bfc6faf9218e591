"""Source and shifted target domains for (source-free, active) domain adaptation: classify the shape.

Source: plain or striped shapes in red, green, blue or yellow on a black background.
Target: dotted or checkered shapes in purple, orange, pink or cyan on the same black background. (A background
shift as well leaves a source-only CNN at chance; this shift leaves it at ~45 %, the regime of the LFTL spec.)
"""

from __future__ import annotations

import os

import numpy as np
from datasets import Dataset

from .cache import cached
from .data import SPLITS, ClassificationSet, Scene, _build_classification, _check_count, random_scene
from .shapes import SHAPES

DOMAINS = ("source", "target")

_DOMAIN_STYLE = {
    "source": dict(colors=("red", "green", "blue", "yellow"), textures=("plain", "striped"), backgrounds=("black",)),
    "target": dict(colors=("purple", "orange", "pink", "cyan"), textures=("dotted", "checkered"),
                   backgrounds=("black",)),
}


def _sampler(domain: str):
    def sample(rng: np.random.Generator, label: int) -> Scene:
        return random_scene(rng, shape=SHAPES[label], **_DOMAIN_STYLE[domain])

    return sample


def make_domain_dataset(domain: str = "source", split: str = "train", n_per_class: int | None = None,
                        seed: int = 0, cache_dir: str | os.PathLike | None = None,
                        use_cache: bool = True) -> Dataset:
    """Shape classification in one domain (default 128 train / 64 test images per class); labels = SHAPES."""
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    n_per_class = n_per_class if n_per_class is not None else (128 if split == "train" else 64)
    _check_count("n_per_class", n_per_class)
    task = ClassificationSet(SHAPES, _sampler(domain), f"shapes, {domain} domain")
    return cached(f"domain-{domain}-{split}", {"n_per_class": n_per_class, "seed": seed},
                  lambda: _build_classification(f"domain-{domain}", task, split, n_per_class, seed),
                  cache_dir, use_cache)
