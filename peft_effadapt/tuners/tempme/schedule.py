"""TempMe's progressive multi-granularity schedule as pure arithmetic: which block does what to how many tokens.

Block kinds (Shen et al., ICLR 2025, §3; official code `module_tome_patch.py`):

* ``"imgme"`` — blocks before the first clip-merge layer: ToMe inside each frame, r = `imgme_r` removed after
  attention (keys as metric, the frame's CLS protected);
* ``"clipme"`` — clip-merge layers: g consecutive frames/clips of a video are concatenated (all CLS in front), r_c
  tokens merged across them *before* attention (block-input hidden states as metric), r_i inside the new clip after
  attention; CLS per sequence c ← c·g;
* ``"intra"`` — every other block after the first clip-merge layer: r = min(⌊N·p_i⌋, ⌊(N − c)/2⌋) after attention.

Rounding: ⌊·⌋ of the exact decimal product (``Fraction(str(p))``), so 0.3 · 10 is 3, not 2.9999….
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from ...merging import max_mergeable


@dataclass(frozen=True)
class LayerPlan:
    """What vision block `layer` does, per sequence: `tokens_in` tokens (`cls_in` of them class tokens) enter;
    ClipMe blocks concatenate `group` sequences and merge `r_cross` tokens before attention; `r_intra` tokens are
    merged after attention; `tokens_out` leave with `cls_out` class tokens. `items_in` / `items_out`: sequences per
    video before / after the block."""

    layer: int
    kind: str
    tokens_in: int
    cls_in: int
    group: int
    r_cross: int
    r_intra: int
    tokens_out: int
    cls_out: int
    items_in: int
    items_out: int


def _floor(value: int, ratio: float) -> int:
    return math.floor(value * Fraction(str(ratio)))


def tempme_plan(
    num_tokens: int,
    num_layers: int,
    num_frames: int = 12,
    imgme_r: int = 2,
    clip_merge_layers: Sequence[int] = (8, 9, 10),
    clip_group_sizes: Sequence[int] = (2, 2, 3),
    cross_clip_merge_ratio: float = 0.30,
    intra_clip_merge_ratio: float = 0.10,
) -> list[LayerPlan]:
    """The per-block plan for `num_frames` frames of `num_tokens` tokens (CLS included) through `num_layers` blocks.

    Raises ValueError naming the problem: clip-merge layers out of range or unsorted, group sizes that do not match
    the layers or whose product does not divide `num_frames`, or an ImgMe r above half of the frame's patches.
    """
    layers, groups = list(clip_merge_layers), list(clip_group_sizes)
    if len(layers) != len(groups):
        raise ValueError(
            f"clip_merge_layers {layers} and clip_group_sizes {groups} must have the same length (one group size per "
            "clip-merge layer)."
        )
    if layers != sorted(set(layers)) or any(not 0 <= i < num_layers for i in layers):
        raise ValueError(
            f"clip_merge_layers must be distinct, increasing layer indices in 0..{num_layers - 1}, got {layers}."
        )
    if any(g < 1 for g in groups):
        raise ValueError(f"clip_group_sizes must be >= 1, got {groups}.")
    items = num_frames
    for layer, g in zip(layers, groups):
        if items % g:
            raise ValueError(
                f"{num_frames} frames cannot be grouped by clip_group_sizes {groups}: at layer {layer} {items} "
                f"frames/clips per video are not divisible by {g}. Use a frame count divisible by "
                f"{math.prod(groups)} (e.g. 12 with 2-2-3)."
            )
        items //= g
    first = layers[0] if layers else num_layers
    plan: list[LayerPlan] = []
    n, c, items = num_tokens, 1, num_frames
    group_of = dict(zip(layers, groups))
    for layer in range(num_layers):
        if layer < first:
            r = imgme_r
            if r > max_mergeable(n, c):
                raise ValueError(
                    f"imgme_r={r} is too large for layer {layer}: {n} tokens per frame enter it and one bipartite step "
                    f"merges at most ({n} - 1) // 2 = {max_mergeable(n, c)}."
                )
            plan.append(LayerPlan(layer, "imgme", n, c, 1, 0, r, n - r, c, items, items))
            n -= r
        elif layer in group_of:
            g = group_of[layer]
            r_c = min(_floor(n * g, cross_clip_merge_ratio), max_mergeable(n * g, c * g))
            m = n * g - r_c
            r_i = min(_floor(m, intra_clip_merge_ratio), max_mergeable(m, c * g))
            plan.append(LayerPlan(layer, "clipme", n, c, g, r_c, r_i, m - r_i, c * g, items, items // g))
            n, c, items = m - r_i, c * g, items // g
        else:
            r = min(_floor(n, intra_clip_merge_ratio), max_mergeable(n, c))
            plan.append(LayerPlan(layer, "intra", n, c, 1, 0, r, n - r, c, items, items))
            n -= r
    return plan


def plan_table(plan: Sequence[LayerPlan]) -> list[tuple]:
    """(layer, kind, tokens in, r_c, r_i, tokens out, CLS per sequence, sequences per video) per block."""
    return [(p.layer, p.kind, p.tokens_in, p.r_cross, p.r_intra, p.tokens_out, p.cls_out, p.items_out) for p in plan]
