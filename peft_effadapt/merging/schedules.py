"""Merging schedules: how many tokens each block removes (r_l), and the checks that a schedule fits a model.

A schedule *spec* is what a user writes in a config; `resolve_schedule` turns it into one int per layer:

* ``int`` r — constant: every block merges r tokens (ToMe's default form);
* ``[r_0, r_1, ...]`` — explicit list, padded with zeros to the depth;
* ``{"r": r, "inflect": x}`` — ToMe's linear ramp from ``⌊r(1−x)⌋`` to ``2r − ⌊r(1−x)⌋``; ``inflect=-1`` is the
  *decreasing* schedule (2r in the first block down to 0), ``inflect=0`` is constant r;
* ``"low"`` / ``"high"`` — PYRA's compression presets. The official tables exist for ViT-B/16 and DeiT-B (12 layers,
  224², 197/198 tokens) and ViT-L/16 (24 layers); for any other geometry the preset keeps the same *fraction* of
  tokens after the same *relative depth* as the ViT-B (12-layer) or ViT-L (24-layer) table (see `scaled_preset`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .matching import max_mergeable

# PYRA's presets (THU-MIG/PYRA model/tome.py get_merging_schedule; Xiong et al., ECCV 2024), keyed by
# (preset, depth, tokens entering layer 0).
PYRA_PRESETS: dict[tuple[str, int, int], tuple[int, ...]] = {
    ("low", 12, 197): (16,) * 11 + (10,),
    ("high", 12, 197): (40, 34, 30, 24, 18, 14, 10, 8, 4, 4, 3, 3),
    ("low", 24, 197): (8,) * 23 + (6,),
    ("high", 24, 197): (20, 19, 18, 17, 15, 13, 13, 12, 10, 9, 8, 6, 6, 4, 4, 4, 3, 3, 2, 2, 1, 1, 1, 1),
    ("low", 12, 198): (16,) * 6 + (10,) * 6,  # DeiT-B (CLS + distillation token)
    ("high", 12, 198): (40, 34, 30, 24, 18, 14, 10, 8, 4, 4, 3, 3),
}
PRESET_NAMES = ("low", "high")


def ramp_schedule(r: int, num_layers: int, inflect: float = 0.0) -> list[int]:
    """ToMe's (r, inflect) schedule: a linear ramp from ``⌊r(1−inflect)⌋`` to ``2r − ⌊r(1−inflect)⌋``."""
    first = int(r * (1.0 - inflect))
    last = 2 * r - first
    if num_layers == 1:
        return [first]
    step = (last - first) / (num_layers - 1)
    return [int(first + step * i) for i in range(num_layers)]


def decreasing_schedule(r: int, num_layers: int) -> list[int]:
    """2r tokens removed in the first block, linearly down to 0 in the last (same total as constant r)."""
    return ramp_schedule(r, num_layers, inflect=-1.0)


def token_counts(schedule: Sequence[int], num_tokens: int) -> list[int]:
    """Tokens entering block 0 followed by the tokens left after each block (no clamping)."""
    counts = [num_tokens]
    for r in schedule:
        counts.append(counts[-1] - r)
    return counts


def _reference_fractions(preset: str, depth: int) -> list[float]:
    table = PYRA_PRESETS[(preset, depth, 197)]
    return [n / 197 for n in token_counts(table, 197)]


def scaled_preset(preset: str, num_layers: int, num_tokens: int, protected: int = 1) -> list[int]:
    """A PYRA preset for a geometry without an official table.

    The reference curve is the ViT-L table for models deeper than 18 layers, the ViT-B table otherwise, read as the
    fraction of tokens left after each block. Block l of an L-block model keeps ``round(N · f(12(l+1)/L))`` tokens
    (f linearly interpolated), and each r_l is clamped to what one bipartite step can merge.
    """
    depth = 24 if num_layers > 18 else 12
    fractions = _reference_fractions(preset, depth)
    schedule: list[int] = []
    current = num_tokens
    for layer in range(num_layers):
        position = depth * (layer + 1) / num_layers
        low = math.floor(position)
        high = min(low + 1, depth)
        frac = fractions[low] + (fractions[high] - fractions[low]) * (position - low)
        target = max(int(round(num_tokens * frac)), protected + 1)
        r = min(max(current - target, 0), max_mergeable(current, protected))
        schedule.append(r)
        current -= r
    return schedule


def resolve_schedule(spec, num_layers: int, num_tokens: int, protected: int = 1) -> list[int]:
    """One int per layer for a schedule spec (see the module docstring). Does not check the 50 % rule; see
    `check_schedule`."""
    if isinstance(spec, bool):
        raise ValueError(f"merge schedule must be an int, a list of ints, 'low', 'high' or a dict, got {spec!r}.")
    if isinstance(spec, int):
        if spec < 0:
            raise ValueError(f"a constant merge schedule must be >= 0, got {spec}.")
        return [spec] * num_layers
    if isinstance(spec, str):
        if spec not in PRESET_NAMES:
            raise ValueError(f"unknown merge schedule preset {spec!r}; presets: {list(PRESET_NAMES)}.")
        table = PYRA_PRESETS.get((spec, num_layers, num_tokens))
        return list(table) if table is not None else scaled_preset(spec, num_layers, num_tokens, protected)
    if isinstance(spec, dict):
        if set(spec) - {"r", "inflect"} or "r" not in spec:
            raise ValueError(f"a ramp schedule is {{'r': int, 'inflect': float}}, got {spec!r}.")
        r, inflect = spec["r"], spec.get("inflect", 0.0)
        # |inflect| > 1 would make one end of the ramp negative (a layer that "un-merges"): refused.
        if (not isinstance(r, int) or isinstance(r, bool) or not 0 <= r < 2**53 or isinstance(inflect, bool)
                or not isinstance(inflect, (int, float)) or not -1 <= inflect <= 1):
            raise ValueError(f"a ramp schedule needs an int r >= 0 and a float inflect in [-1, 1], got {spec!r}.")
        return ramp_schedule(r, num_layers, float(inflect))
    if isinstance(spec, (list, tuple)):
        values = list(spec)
        if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in values):
            raise ValueError(f"a merge schedule list must hold ints >= 0, got {spec!r}.")
        if len(values) > num_layers:
            raise ValueError(f"the merge schedule has {len(values)} entries but the model has {num_layers} layers.")
        return values + [0] * (num_layers - len(values))
    raise ValueError(f"merge schedule must be an int, a list of ints, 'low', 'high' or a dict, got {spec!r}.")


def validate_spec(spec) -> None:
    """Config-time check of a schedule spec's form (the depth is not known yet)."""
    resolve_schedule(spec, num_layers=len(spec) if isinstance(spec, (list, tuple)) else 1, num_tokens=1_000_000)


def check_schedule(
    schedule: Sequence[int], num_tokens: int, protected: int = 1, layer_names: Sequence[str] | None = None
) -> list[int]:
    """Raises ValueError naming the first layer whose r exceeds ``(tokens entering it − protected) // 2``; returns
    the token counts (entering block 0, then after each block)."""
    current = num_tokens
    counts = [current]
    for layer, r in enumerate(schedule):
        allowed = max_mergeable(current, protected)
        if r > allowed:
            name = f" ({layer_names[layer]})" if layer_names is not None else ""
            raise ValueError(
                f"The merge schedule removes r={r} tokens in layer {layer}{name}, but only {current} tokens enter that "
                f"layer ({protected} protected): one bipartite step can merge at most ({current} - {protected}) // 2 "
                f"= {allowed}. Schedule: {list(schedule)}."
            )
        current -= r
        counts.append(current)
    return counts


def clamp_schedule(schedule: Sequence[int], num_tokens: int, protected: int = 1) -> list[int]:
    """What the reference ToMe actually removes when r exceeds the 50 % rule: each r_l clamped in turn."""
    current, clamped = num_tokens, []
    for r in schedule:
        r = min(r, max_mergeable(current, protected))
        clamped.append(r)
        current -= r
    return clamped
