"""Procedural 32x32 RGB images of small coloured shapes (numpy only, deterministic given a `numpy` Generator).

An image is described by a `ShapeSpec` (shape, colour, size, position, texture) drawn on a background; the renderer
anti-aliases by supersampling and draws either solid shapes ("photo" style) or cartoon-like drawings with a pale fill
and a dark outline on white ("drawing" style, never seen in CLIP pretraining: a style shift like ImageNet-R).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 32
_SUPERSAMPLE = 4

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "star", "hexagon")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "pink", "cyan")
SIZES = ("small", "medium", "large")
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
TEXTURES = ("plain", "striped", "dotted", "checkered")
BACKGROUNDS = ("black", "gray", "noisy", "white")
STYLES = ("photo", "drawing")

_RGB = {
    "red": (0.90, 0.12, 0.10),
    "green": (0.10, 0.72, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.90, 0.10),
    "purple": (0.58, 0.20, 0.80),
    "orange": (1.00, 0.55, 0.05),
    "pink": (1.00, 0.50, 0.75),
    "cyan": (0.10, 0.85, 0.90),
}
_RADIUS = {"small": 4.5, "medium": 7.0, "large": 10.0}


@dataclass(frozen=True)
class ShapeSpec:
    """One object: names from SHAPES, COLORS, SIZES, POSITIONS, TEXTURES."""

    shape: str
    color: str
    size: str
    position: str
    texture: str = "plain"

    def __post_init__(self) -> None:
        for field, vocab in (("shape", SHAPES), ("color", COLORS), ("size", SIZES), ("position", POSITIONS),
                             ("texture", TEXTURES)):
            value = getattr(self, field)
            if value not in vocab:
                raise ValueError(f"ShapeSpec.{field}={value!r} is not one of {vocab}")


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of `shape` in normalised coordinates (radius 1, v pointing down)."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.82
    if shape == "triangle":
        return (v <= 0.72) & (np.abs(u) <= (v + 0.95) * 0.58)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == "cross":
        arm = 0.34
        return ((np.abs(u) <= arm) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= arm) & (np.abs(u) <= 0.95))
    if shape == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.36)
    if shape == "star":
        theta = np.arctan2(v, u) + np.pi / 2
        phase = (theta * 5 / (2 * np.pi)) % 1.0
        spike = np.abs(phase - 0.5) * 2  # 1 at the points, 0 between them
        return np.sqrt(u * u + v * v) <= 0.42 + 0.6 * spike
    if shape == "hexagon":
        au, av = np.abs(u), np.abs(v)
        return np.maximum(au * 0.866 + av * 0.5, av) <= 0.9
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _texture(texture: str, xs: np.ndarray, ys: np.ndarray, phase: float) -> np.ndarray:
    """Brightness factor in [0.3, 1] per pixel for a texture (pixel coordinates)."""
    if texture == "plain":
        return np.ones_like(xs)
    if texture == "striped":
        on = np.floor((xs + ys + phase) / 2.5) % 2 == 0
    elif texture == "dotted":
        dx = (xs + phase) % 4.0 - 2.0
        dy = (ys + phase) % 4.0 - 2.0
        on = dx * dx + dy * dy > 1.3
    elif texture == "checkered":
        on = (np.floor((xs + phase) / 3.0) + np.floor((ys + phase) / 3.0)) % 2 == 0
    else:
        raise ValueError(f"unknown texture {texture!r}; expected one of {TEXTURES}")
    return np.where(on, 1.0, 0.3)


def _grid(n: int, factor: int) -> tuple[np.ndarray, np.ndarray]:
    coords = (np.arange(n * factor) + 0.5) / factor
    return np.meshgrid(coords, coords)  # xs, ys in pixel units


_FINE = _grid(IMAGE_SIZE, _SUPERSAMPLE)
_COARSE = _grid(IMAGE_SIZE, 1)


def place(spec: ShapeSpec, rng: np.random.Generator) -> tuple[float, float, float]:
    """Centre x, centre y and radius (pixels) of an object, with a little jitter."""
    radius = _RADIUS[spec.size] * rng.uniform(0.92, 1.08)
    row, col = divmod(POSITIONS.index(spec.position), 3)
    margin = radius + 1.5
    anchors = (margin, IMAGE_SIZE / 2, IMAGE_SIZE - margin)
    cx = anchors[col] + rng.uniform(-1.5, 1.5)
    cy = anchors[row] + rng.uniform(-1.5, 1.5)
    lo, hi = radius + 0.5, IMAGE_SIZE - radius - 0.5
    return float(np.clip(cx, lo, hi)), float(np.clip(cy, lo, hi)), float(radius)


def coverage(shape: str, cx: float, cy: float, radius: float, outline: float = 0.0) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of one shape, shape (32, 32); `outline` > 0 draws only a border that wide."""
    xs, ys = _FINE
    u, v = (xs - cx) / radius, (ys - cy) / radius
    mask = _inside(shape, u, v)
    if outline > 0:
        inner = radius - outline
        mask &= ~_inside(shape, (xs - cx) / inner, (ys - cy) / inner)
    f = _SUPERSAMPLE
    return mask.reshape(IMAGE_SIZE, f, IMAGE_SIZE, f).mean(axis=(1, 3))


def background(kind: str, rng: np.random.Generator) -> np.ndarray:
    """A (32, 32, 3) float background in [0, 1]: black, gray, noisy or white (drawings are always on white)."""
    shape = (IMAGE_SIZE, IMAGE_SIZE, 3)
    if kind == "black":
        return np.clip(0.05 + rng.normal(0, 0.02, shape), 0, 1)
    if kind == "gray":
        tint = rng.uniform(-0.04, 0.04, 3)
        return np.clip(0.45 + tint + rng.normal(0, 0.02, shape), 0, 1)
    if kind == "noisy":
        cells = (IMAGE_SIZE // 4, IMAGE_SIZE // 4)
        coarse = rng.uniform(0.0, 0.5, cells + (1,)) + rng.uniform(-0.08, 0.08, cells + (3,))
        return np.clip(np.kron(coarse, np.ones((4, 4, 1))) + rng.normal(0, 0.06, shape), 0, 1)
    if kind == "white":
        return np.clip(0.94 + rng.normal(0, 0.02, shape), 0, 1)
    raise ValueError(f"unknown background {kind!r}; expected one of {BACKGROUNDS}")


def paint(canvas: np.ndarray, spec: ShapeSpec, rng: np.random.Generator, style: str = "photo",
          where: tuple[float, float, float] | None = None) -> np.ndarray:
    """Draw one object onto a float (32, 32, 3) canvas in place and return it."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")
    cx, cy, radius = where if where is not None else place(spec, rng)
    rgb = np.clip(np.asarray(_RGB[spec.color]) + rng.uniform(-0.07, 0.07, 3), 0, 1)
    xs, ys = _COARSE
    shade = _texture(spec.texture, xs, ys, phase=float(rng.uniform(0, 4)))[..., None]
    alpha = coverage(spec.shape, cx, cy, radius)[..., None]
    if style == "drawing":  # pale fill (textured), then an outline in a darker shade of the colour
        canvas[:] = canvas * (1 - alpha) + (0.5 + 0.5 * rgb * shade) * alpha
        line = coverage(spec.shape, cx, cy, radius, outline=1.6)[..., None]
        canvas[:] = canvas * (1 - line) + (0.5 * rgb) * line
    else:
        canvas[:] = canvas * (1 - alpha) + (rgb * shade) * alpha
    return canvas


def to_uint8(canvas: np.ndarray) -> np.ndarray:
    return np.round(np.clip(canvas, 0, 1) * 255).astype(np.uint8)


def render(spec: ShapeSpec, rng: np.random.Generator, bg: str = "black", style: str = "photo",
           distractors: int = 0) -> np.ndarray:
    """Render one image (uint8, (32, 32, 3)). Distractors are extra small shapes drawn before the main object."""
    canvas = background("white" if style == "drawing" else bg, rng)
    for _ in range(distractors):
        other = ShapeSpec(shape=str(rng.choice(SHAPES)), color=str(rng.choice(COLORS)), size="small",
                          position=str(rng.choice(POSITIONS)), texture="plain")
        paint(canvas, other, rng, style=style)
    paint(canvas, spec, rng, style=style)
    return to_uint8(canvas)
