"""Caption grammar for the shapes images: full or partial attribute lists in natural language."""

from __future__ import annotations

import numpy as np

from .shapes import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES, TEXTURES, ShapeSpec

TEXTURE_PHRASES = {"plain": "with no pattern", "striped": "with stripes", "dotted": "with dots",
                   "checkered": "with checks"}
POSITION_PHRASES = {
    "top left": "at the top left", "top": "at the top", "top right": "at the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "at the bottom left", "bottom": "at the bottom", "bottom right": "at the bottom right",
}  # fmt: skip
PREFIXES = ("a photo of", "an image of", "a picture of", "")
TEMPLATE = "a photo of a {}."


def with_article(phrase: str) -> str:
    """'orange circle' -> 'an orange circle'."""
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def describe(spec: ShapeSpec, bg: str | None = None, *, size: bool = True, color: bool = True,
             texture: str | None = "adjective", shape: bool = True, position: bool = True) -> str:
    """Noun phrase for an object; each attribute can be left out (texture: 'adjective', 'phrase' or None)."""
    words = [spec.size] if size else []
    if color:
        words.append(spec.color)
    if texture == "adjective":
        words.append(spec.texture)
    words.append(spec.shape if shape else "shape")
    if texture == "phrase":
        words.append(TEXTURE_PHRASES[spec.texture])
    if position:
        words.append(POSITION_PHRASES[spec.position])
    if bg is not None:
        words.append(f"on a {bg} background")
    return " ".join(words)


def full_caption(spec: ShapeSpec, bg: str) -> str:
    """Caption naming every attribute, e.g. 'a large red striped circle at the top left on a gray background'."""
    return with_article(describe(spec, bg))


def random_caption(spec: ShapeSpec, bg: str, rng: np.random.Generator, keep: float = 0.5,
                   return_mentions: bool = False) -> str | tuple[str, dict[str, bool]]:
    """Caption naming a random subset of attributes (shape kept 90 % of the time) with a random prefix.
    With `return_mentions`, also returns which attributes the caption names (for multi-positive contrastive losses).
    """
    mentions = {
        "texture": rng.random() < keep, "background": rng.random() < keep * 0.6, "size": rng.random() < keep,
        "color": rng.random() < keep + 0.2, "shape": rng.random() < 0.9, "position": rng.random() < keep,
    }
    texture = str(rng.choice(["adjective", "phrase"])) if mentions["texture"] else None
    phrase = describe(spec, bg if mentions["background"] else None, size=mentions["size"], color=mentions["color"],
                      texture=texture, shape=mentions["shape"], position=mentions["position"])
    prefix = str(rng.choice(PREFIXES))
    text = with_article(phrase)
    text = f"{prefix} {text}" if prefix else text
    text = text + "." if rng.random() < 0.5 else text
    return (text, mentions) if return_mentions else text


def vocabulary_words() -> list[str]:
    """Every word the grammar can produce (for tokenizer training)."""
    text = " ".join(
        list(SHAPES) + list(COLORS) + list(SIZES) + list(POSITIONS) + list(TEXTURES) + list(BACKGROUNDS)
        + list(TEXTURE_PHRASES.values()) + list(POSITION_PHRASES.values()) + list(PREFIXES)
        + ["a", "an", "on", "background", "shape", "photo", "of"]
    )
    return sorted(set(text.split()))
