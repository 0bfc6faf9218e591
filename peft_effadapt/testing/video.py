"""Short captioned videos of one shape that moves or changes, for text-video retrieval.

Each row: `frames` (uint8, frames x 32 x 32 x 3), `caption` ("a red square moves left", "a blue circle turns
yellow"), and ClassLabel columns `event`, `shape`, `color` (start colour), `end_color`, `background`.
"""

from __future__ import annotations

import os

import numpy as np
from datasets import Array4D, ClassLabel, Dataset, Features, Value

from .cache import cached
from .data import _check_count, row_rng
from .shapes import _RGB, BACKGROUNDS, COLORS, IMAGE_SIZE, SHAPES, background, coverage, to_uint8

EVENTS = ("moves left", "moves right", "moves up", "moves down", "grows", "shrinks", "changes color")
NUM_FRAMES = 12


def video_caption(shape: str, color: str, event: str, end_color: str | None = None) -> str:
    """'a red square moves left'; colour changes read 'a red square turns blue'."""
    subject = f"{'an' if color[0] in 'aeiou' else 'a'} {color} {shape}"
    return f"{subject} turns {end_color}" if event == "changes color" else f"{subject} {event}"


def _trajectory(event: str, rng: np.random.Generator, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-frame centre x, centre y and radius for an event; t runs from 0 to 1."""
    if event in ("grows", "shrinks"):
        small, large = 4.0, 11.0
        radius = small + (large - small) * (t if event == "grows" else 1 - t)
        cx = np.full_like(t, IMAGE_SIZE / 2 + rng.uniform(-2, 2))
        cy = np.full_like(t, IMAGE_SIZE / 2 + rng.uniform(-2, 2))
        return cx, cy, radius
    radius = np.full_like(t, rng.uniform(5.5, 7.5))
    lo, hi = radius[0] + 1, IMAGE_SIZE - radius[0] - 1
    along = lo + (hi - lo) * t
    across = np.full_like(t, rng.uniform(lo, hi))
    if event == "moves left":
        return along[::-1], across, radius
    if event == "moves right":
        return along, across, radius
    if event == "moves up":
        return across, along[::-1], radius
    if event == "moves down":
        return across, along, radius
    # colour change: the shape stays put at a random place
    return np.full_like(t, rng.uniform(lo, hi)), np.full_like(t, rng.uniform(lo, hi)), radius


def render_video(shape: str, color: str, event: str, bg: str, rng: np.random.Generator,
                 end_color: str | None = None, num_frames: int = NUM_FRAMES) -> np.ndarray:
    """Frames (uint8, num_frames x 32 x 32 x 3) of one event on a fixed background."""
    if event not in EVENTS:
        raise ValueError(f"unknown event {event!r}; expected one of {EVENTS}")
    t = np.linspace(0.0, 1.0, num_frames)
    cx, cy, radius = _trajectory(event, rng, t)
    start = np.clip(np.asarray(_RGB[color]) + rng.uniform(-0.05, 0.05, 3), 0, 1)
    end = np.asarray(_RGB[end_color]) if end_color else start
    backdrop = background(bg, rng)
    frames = []
    for k in range(num_frames):
        mix = np.clip((t[k] - 0.3) / 0.4, 0, 1) if event == "changes color" else 0.0  # fade in the middle third
        rgb = (1 - mix) * start + mix * end
        alpha = coverage(shape, float(cx[k]), float(cy[k]), float(radius[k]))[..., None]
        frames.append(to_uint8(backdrop * (1 - alpha) + rgb * alpha))
    return np.stack(frames)


def make_video_dataset(n: int = 256, seed: int = 0, num_frames: int = NUM_FRAMES,
                       cache_dir: str | os.PathLike | None = None, use_cache: bool = True) -> Dataset:
    """`n` captioned videos with events, shapes, colours and backgrounds drawn uniformly (seeded)."""
    _check_count("n", n)
    _check_count("num_frames", num_frames)
    if num_frames < 2:
        raise ValueError(f"num_frames must be at least 2 for an event to happen, got {num_frames}")

    def build() -> Dataset:
        rows = {k: [] for k in ("frames", "caption", "event", "shape", "color", "end_color", "background")}
        for i in range(n):
            rng = row_rng("videos", seed, "train", i)
            event = str(EVENTS[i % len(EVENTS)])
            shape, color, bg = (str(rng.choice(v)) for v in (SHAPES, COLORS, BACKGROUNDS))
            end_color = str(rng.choice([c for c in COLORS if c != color])) if event == "changes color" else color
            rows["frames"].append(render_video(shape, color, event, bg, rng,
                                               end_color if event == "changes color" else None, num_frames))
            rows["caption"].append(video_caption(shape, color, event, end_color))
            for k, v in (("event", event), ("shape", shape), ("color", color), ("end_color", end_color),
                         ("background", bg)):
                rows[k].append(features[k].str2int(v))
        return Dataset.from_dict(rows, features=features)

    features = Features({
        "frames": Array4D(shape=(num_frames, IMAGE_SIZE, IMAGE_SIZE, 3), dtype="uint8"),
        "caption": Value("string"),
        "event": ClassLabel(names=list(EVENTS)),
        "shape": ClassLabel(names=list(SHAPES)),
        "color": ClassLabel(names=list(COLORS)),
        "end_color": ClassLabel(names=list(COLORS)),
        "background": ClassLabel(names=list(BACKGROUNDS)),
    })
    return cached("videos", {"n": n, "seed": seed, "num_frames": num_frames}, build, cache_dir, use_cache)


def video_vocabulary_words() -> list[str]:
    return sorted({w for e in EVENTS for w in e.split()} | {"turns", "a", "an"})
