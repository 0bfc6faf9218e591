"""ResRep's mask schedule: one global, from-scratch greedy choice of the channels to forget (official
`resrep_mask_model`), driven by an exact FLOPs model."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..flops import FlopsModel
from ..flops import round_to as _round_to


def choose_masks(norms: Mapping[str, torch.Tensor], flops: FlopsModel, flops_target: float, *,
                 current: Mapping[str, torch.Tensor] | None = None, granularity: int = 4, min_channels: Mapping[str, int] | None = None,
                 round_to: int | None = None) -> dict[str, torch.Tensor]:
    """New masks (1 = keep, 0 = forget) for the groups in `norms` (compactor row norms).

    Walks all (group, channel) pairs in ascending norm order from the original widths, taking a channel unless its
    group is at its minimum width, until FLOPs(widths) <= `flops_target`·baseline or, while the `current` masks
    are still above target, (number masked now + `granularity`) channels were taken. Deviation: the official code
    also counts the skipped entries toward that cap, which stalls for good once the smallest norms belong to layers
    at their minimum width (likely with `min_keep_ratio`); here only taken channels count. With `round_to`, FLOPs
    use widths rounded up to the multiple, each group finally keeps its rounded width (the largest-norm chosen
    channels are given back) and the cap counts only the channels that stay masked after that rounding, so every
    update above target masks at least `granularity` more channels (or all it can) and the target is reached."""
    min_channels = dict(min_channels or {})
    sizes = {name: int(n.numel()) for name, n in norms.items()}
    widths = dict(sizes)
    goal = flops_target * flops.baseline

    def effective(name: str, width: int) -> int:
        return _round_to(width, round_to, sizes[name])

    eff = {name: effective(name, w) for name, w in widths.items()}
    now = flops.flops(eff)
    order = sorted(((float(v), name, ch) for name, n in norms.items() for ch, v in enumerate(n.tolist())),
                   key=lambda item: item[0])
    current = current or {name: torch.ones_like(n) for name, n in norms.items()}
    current_widths = {name: effective(name, int((m != 0).sum())) for name, m in current.items()}
    masked_now = sum(sizes[name] - w for name, w in current_widths.items())
    cap = masked_now + granularity if flops.ratio(current_widths) > flops_target else None
    chosen: dict[str, list[int]] = {name: [] for name in norms}
    masked = 0  # channels that stay masked after rounding: sum of size - effective width
    for _, name, ch in order:
        if now <= goal or (cap is not None and masked >= cap):
            break
        if widths[name] <= max(1, min_channels.get(name, 1)):
            continue
        widths[name] -= 1
        chosen[name].append(ch)
        new_eff = effective(name, widths[name])
        if new_eff != eff[name]:
            before = flops.group_cost(eff, name)
            masked += eff[name] - new_eff
            eff[name] = new_eff
            now -= before - flops.group_cost(eff, name)
    masks = {}
    for name, n in norms.items():
        drop = chosen[name][: sizes[name] - eff[name]]  # ascending norm: give back the largest-norm ones
        mask = torch.ones(sizes[name], dtype=n.dtype, device=n.device)
        if drop:
            mask[torch.tensor(drop, device=n.device)] = 0
        masks[name] = mask
    return masks


def masked_widths(masks: Mapping[str, torch.Tensor]) -> dict[str, int]:
    return {name: int((m != 0).sum()) for name, m in masks.items()}
