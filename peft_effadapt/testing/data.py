"""Generated image datasets: captioned shapes for CLIP pretraining and downstream classification sets.

Every row holds `image` (uint8, 32x32x3), `label` (a `ClassLabel` whose names are the natural-language class
names used in prompts) and the object's attributes as `ClassLabel` columns. Rows are a pure function of
(name, split, seed, row index), so the same seed gives identical rows on any machine.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from datasets import Array3D, ClassLabel, Dataset, Features, Value

from .cache import cached
from .captions import full_caption, random_caption
from .shapes import BACKGROUNDS, COLORS, IMAGE_SIZE, POSITIONS, SHAPES, SIZES, STYLES, TEXTURES, ShapeSpec, render

SPLITS = ("train", "test")

# Colour-shape pairs never shown during CLIP pretraining (one colour per shape, one shape per colour).
HELD_OUT_PAIRS = frozenset((SHAPES[i], COLORS[(3 * i + 1) % len(COLORS)]) for i in range(len(SHAPES)))
_SEEN_PAIRS = tuple((SHAPES[i], COLORS[(3 * i + 2) % len(COLORS)]) for i in range(len(SHAPES)))
_OBJECT_PAIRS = tuple(p for pair in zip(_SEEN_PAIRS, sorted(HELD_OUT_PAIRS, key=lambda p: SHAPES.index(p[0])))
                      for p in pair)  # alternating seen / held-out, so both halves of a base-novel split mix them


def attribute_features() -> dict:
    return {
        "shape": ClassLabel(names=list(SHAPES)),
        "color": ClassLabel(names=list(COLORS)),
        "size": ClassLabel(names=list(SIZES)),
        "position": ClassLabel(names=list(POSITIONS)),
        "texture": ClassLabel(names=list(TEXTURES)),
        "background": ClassLabel(names=list(BACKGROUNDS)),
        "style": ClassLabel(names=list(STYLES)),
    }


IMAGE_FEATURE = Array3D(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype="uint8")


@dataclass(frozen=True)
class Scene:
    spec: ShapeSpec
    bg: str = "black"
    style: str = "photo"
    distractors: int = 0

    def render(self, rng: np.random.Generator) -> np.ndarray:
        return render(self.spec, rng, bg=self.bg, style=self.style, distractors=self.distractors)

    def attributes(self) -> dict[str, str]:
        s = self.spec
        return {"shape": s.shape, "color": s.color, "size": s.size, "position": s.position, "texture": s.texture,
                "background": self.bg, "style": self.style}


def _salt(name: str) -> int:
    return zlib.crc32(name.encode())


def row_rng(name: str, seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _salt(name), SPLITS.index(split), index])


def _pick(rng: np.random.Generator, values, p=None) -> str:
    return str(values[rng.choice(len(values), p=p)])


def random_scene(rng: np.random.Generator, *, shape: str | None = None, color: str | None = None,
                 texture: str | None = None, sizes=SIZES, backgrounds=BACKGROUNDS, colors=COLORS,
                 textures=TEXTURES, style: str = "photo", distractors: int = 0) -> Scene:
    """A random scene; fixed attributes are passed by name, the others are drawn uniformly from their lists."""
    spec = ShapeSpec(
        shape=shape or _pick(rng, SHAPES), color=color or _pick(rng, colors), size=_pick(rng, sizes),
        position=_pick(rng, POSITIONS), texture=texture or _pick(rng, textures),
    )
    bg = _pick(rng, backgrounds)
    return Scene(spec, bg="white" if style == "drawing" else bg, style=style, distractors=distractors)


def pretraining_scene(rng: np.random.Generator) -> Scene:
    """Scenes CLIP is pretrained on: photo style, no held-out colour-shape pair; 15 % have one or two small
    distractors next to a medium or large main object (the caption describes the main object only)."""
    while True:
        shape, color = _pick(rng, SHAPES), _pick(rng, COLORS)
        if (shape, color) not in HELD_OUT_PAIRS:
            break
    texture = _pick(rng, TEXTURES, p=[0.4, 0.2, 0.2, 0.2])
    if rng.random() < 0.15:
        return random_scene(rng, shape=shape, color=color, texture=texture, sizes=("medium", "large"),
                            distractors=int(rng.integers(1, 3)))
    return random_scene(rng, shape=shape, color=color, texture=texture)


def _check_count(name: str, value: int) -> None:
    if not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def make_caption_dataset(n: int = 20000, seed: int = 0, cache_dir: str | os.PathLike | None = None,
                         use_cache: bool = True) -> Dataset:
    """Captioned single-shape images for CLIP pretraining: columns image, caption (random partial attribute list),
    full_caption (every attribute) and the attributes as ClassLabels. Held-out colour-shape pairs never appear."""
    _check_count("n", n)

    def build() -> Dataset:
        rows = {k: [] for k in ("image", "caption", "full_caption", *attribute_features())}
        for i in range(n):
            rng = row_rng("captions", seed, "train", i)
            scene = pretraining_scene(rng)
            rows["image"].append(scene.render(rng))
            rows["caption"].append(random_caption(scene.spec, scene.bg, rng))
            rows["full_caption"].append(full_caption(scene.spec, scene.bg))
            for k, v in scene.attributes().items():
                rows[k].append(v)
        feats = Features({"image": IMAGE_FEATURE, "caption": Value("string"), "full_caption": Value("string"),
                          **attribute_features()})
        return Dataset.from_dict(_encode(rows, feats), features=feats)

    return cached("captions", {"n": n, "seed": seed}, build, cache_dir, use_cache)


@dataclass(frozen=True)
class ClassificationSet:
    """A downstream task: class names (prompt-ready) and a sampler of a scene for a class index."""

    class_names: tuple[str, ...]
    sample: Callable[[np.random.Generator, int], Scene]
    description: str


def _shape_task(**kwargs) -> Callable[[np.random.Generator, int], Scene]:
    return lambda rng, label: random_scene(rng, shape=SHAPES[label], **kwargs)


CLASSIFICATION_SETS: dict[str, ClassificationSet] = {
    "shapes": ClassificationSet(SHAPES, _shape_task(), "which shape; everything else random (in-distribution)"),
    "colors": ClassificationSet(
        tuple(f"{c} shape" for c in COLORS), lambda rng, label: random_scene(rng, color=COLORS[label]),
        "which colour; everything else random"),
    "textures": ClassificationSet(
        tuple(f"{t} shape" for t in TEXTURES),
        lambda rng, label: random_scene(rng, texture=TEXTURES[label], sizes=("medium", "large")),
        "which surface pattern (fine detail at 32x32)"),
    "objects": ClassificationSet(
        tuple(f"{c} {s}" for s, c in _OBJECT_PAIRS),
        lambda rng, label: random_scene(rng, shape=_OBJECT_PAIRS[label][0], color=_OBJECT_PAIRS[label][1]),
        "colour-shape pairs; every odd class is a pair never seen in pretraining"),
    "clutter": ClassificationSet(
        SHAPES, _shape_task(sizes=("medium", "large"), backgrounds=("gray", "noisy"), distractors=3),
        "the large shape among three small distractors on busy backgrounds"),
    "drawings": ClassificationSet(SHAPES, _shape_task(style="drawing"),
                                  "cartoon drawings: pale fill, dark outline, white paper (style shift)"),
}


def _encode(rows: dict, feats: Features) -> dict:
    out = {}
    for k, values in rows.items():
        feat = feats[k]
        out[k] = [feat.str2int(v) for v in values] if isinstance(feat, ClassLabel) else values
    return out


def make_classification_dataset(name: str, split: str = "train", n_per_class: int | None = None, seed: int = 0,
                                cache_dir: str | os.PathLike | None = None, use_cache: bool = True) -> Dataset:
    """A downstream set from CLASSIFICATION_SETS (default 64 train / 32 test images per class), balanced and
    shuffled. `label` names are the class names for prompts, e.g. 'a photo of a {name}.'."""
    if name not in CLASSIFICATION_SETS:
        raise ValueError(f"unknown classification set {name!r}; expected one of {sorted(CLASSIFICATION_SETS)}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    task = CLASSIFICATION_SETS[name]
    n_per_class = n_per_class if n_per_class is not None else (64 if split == "train" else 32)
    _check_count("n_per_class", n_per_class)
    return cached(f"cls-{name}-{split}", {"n_per_class": n_per_class, "seed": seed},
                  lambda: _build_classification(name, task, split, n_per_class, seed), cache_dir, use_cache)


def _build_classification(name: str, task: ClassificationSet, split: str, n_per_class: int, seed: int) -> Dataset:
    n_classes = len(task.class_names)
    total = n_classes * n_per_class
    order = np.random.default_rng([seed, _salt(name), SPLITS.index(split)]).permutation(total)
    rows = {k: [] for k in ("image", "label", *attribute_features())}
    for i in order:
        label = int(i % n_classes)
        rng = row_rng(name, seed, split, int(i))
        scene = task.sample(rng, label)
        rows["image"].append(scene.render(rng))
        rows["label"].append(task.class_names[label])
        for k, v in scene.attributes().items():
            rows[k].append(v)
    feats = Features({"image": IMAGE_FEATURE, "label": ClassLabel(names=list(task.class_names)),
                      **attribute_features()})
    return Dataset.from_dict(_encode(rows, feats), features=feats)


def class_names(dataset: Dataset, label_column: str = "label") -> list[str]:
    """The ClassLabel names of a dataset's label column."""
    feat = dataset.features.get(label_column)
    if not isinstance(feat, ClassLabel):
        raise ValueError(f"column {label_column!r} is not a ClassLabel (found {type(feat).__name__})")
    return list(feat.names)
