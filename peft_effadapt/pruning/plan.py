"""Slimming plans: which channels of each group survive, stored as JSON beside `model.safetensors` (see
`slimmed.py` for the save/load pair that rebuilds the exact slimmed architecture).

A plan lists, per channel group, the kept channel indices `keep` (in the original numbering). C-SGD's trim also gives
`clusters`: `keep[i]` stands for every member of `clusters[i]`, and each consumer's input slices of all members are
summed into the kept slice (exact when the members' outputs are identical). Plans hold the group definitions (module
paths), so replaying one needs no tracing: `load_slimmed` builds the stock model from `config.json`, applies the plan
to it, checks every tensor shape against `model.safetensors` and only then loads strictly.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from ..validation import VERSION_KEY, fields_to_drop, installed_version, newer_fields_warning, writer_version
from .flops import round_to as _round_to
from .flops import width_multiple
from .groups import ChannelGroup

PLAN_NAME = "slimming_plan.json"
FORMAT_VERSION = 1
# plans written before `peft_effadapt_version` was recorded name their writer `library_version`
_VERSION_KEYS = (VERSION_KEY, "library_version")
_PLAN_KEYS = frozenset({"format_version", "library", *_VERSION_KEYS, "method", "base_model", "round_to", "metadata",
                        "groups"})
_GROUP_KEYS = frozenset({*(f.name for f in fields(ChannelGroup)), "keep", "width", "clusters"})


@dataclass
class GroupPlan:
    """Kept channels of one group (original numbering); `clusters[i]` (optional) are the channels `keep[i]` stands
    for."""

    group: ChannelGroup
    keep: list[int]
    clusters: list[list[int]] | None = None

    @property
    def width(self) -> int:
        return len(self.keep)

    def validate(self) -> None:
        name, size = self.group.name, self.group.size
        if not self.keep:
            raise ValueError(f"Slimming plan keeps no channel of group {name!r}; keep at least one.")
        if len(set(self.keep)) != len(self.keep) or min(self.keep) < 0 or max(self.keep) >= size:
            raise ValueError(f"Group {name!r}: keep indices must be distinct and in [0, {size}), got {self.keep}.")
        if self.clusters is None:
            return
        if len(self.clusters) != len(self.keep):
            raise ValueError(f"Group {name!r}: {len(self.clusters)} clusters for {len(self.keep)} kept channels.")
        seen: set[int] = set()
        for kept, members in zip(self.keep, self.clusters):
            if kept not in members:
                raise ValueError(f"Group {name!r}: kept channel {kept} is not in its cluster {members}.")
            if seen & set(members) or min(members) < 0 or max(members) >= size:
                raise ValueError(f"Group {name!r}: clusters must be disjoint channel sets in [0, {size}).")
            seen |= set(members)


@dataclass
class SlimmingPlan:
    """Per-group kept channels, plus provenance (`method`, `base_model`, `round_to`, free-form `metadata`)."""

    groups: list[GroupPlan]
    round_to: int | None = None
    method: str | None = None
    base_model: str | None = None
    metadata: dict = field(default_factory=dict)

    @property
    def widths(self) -> dict[str, int]:
        return {p.group.name: p.width for p in self.groups}

    def __getitem__(self, name: str) -> GroupPlan:
        for plan in self.groups:
            if plan.group.name == name:
                return plan
        raise KeyError(name)

    def validate(self) -> None:
        """Model-independent checks (indices, clusters, round_to); `apply_plan` also checks the model."""
        names = [p.group.name for p in self.groups]
        if len(set(names)) != len(names):
            raise ValueError(f"Slimming plan lists a group twice: {names}.")
        for plan in self.groups:
            plan.validate()
            if self.round_to and plan.width != _round_to(plan.width, self.round_to, plan.group.size):
                raise ValueError(f"Group {plan.group.name!r} keeps {plan.width} channels, not a multiple of "
                                 f"round_to={self.round_to} (nor its full size {plan.group.size}).")

    def to_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "library": "peft_effadapt",
            VERSION_KEY: installed_version(),
            "method": self.method,
            "base_model": self.base_model,
            "round_to": self.round_to,
            "metadata": self.metadata,
            "groups": [{**p.group.to_dict(), "keep": list(p.keep), "width": p.width,
                        "clusters": p.clusters} for p in self.groups],
        }

    @classmethod
    def from_dict(cls, data: Mapping, source: str = "Slimming plan") -> SlimmingPlan:
        """Reads a plan written by `to_dict`. Fields a newer peft_effadapt added are dropped with one warning;
        unknown fields from this or an older version raise ValueError naming the closest known one."""
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"Unsupported slimming plan format_version {version!r} (this library reads "
                             f"{FORMAT_VERSION}).")
        writer = writer_version(data, source, _VERSION_KEYS)
        entries = [dict(entry) for entry in data["groups"]]
        dropped = fields_to_drop(data, _PLAN_KEYS, source, "SlimmingPlan", writer)
        dropped_in_groups = fields_to_drop({key for entry in entries for key in entry}, _GROUP_KEYS, source,
                                           "a slimming plan group", writer)
        if dropped or dropped_in_groups:
            warnings.warn(newer_fields_warning(dropped + [f"groups[].{key}" for key in dropped_in_groups], source,
                                               writer), UserWarning, stacklevel=2)
        groups = []
        for entry in entries:
            for key in dropped_in_groups:
                entry.pop(key, None)
            keep, clusters = [int(i) for i in entry.pop("keep")], entry.pop("clusters", None)
            entry.pop("width", None)
            groups.append(GroupPlan(ChannelGroup.from_dict(entry), keep,
                                    [[int(i) for i in c] for c in clusters] if clusters is not None else None))
        plan = cls(groups, data.get("round_to"), data.get("method"), data.get("base_model"),
                   dict(data.get("metadata") or {}))
        plan.validate()
        return plan

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / PLAN_NAME
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> SlimmingPlan:
        path = Path(directory) / PLAN_NAME
        if not path.is_file():
            raise FileNotFoundError(f"No {PLAN_NAME} in {directory}: not a slimmed-model folder.")
        return cls.from_dict(json.loads(path.read_text()), source=f"Slimming plan {path}")

    def then(self, later: SlimmingPlan) -> SlimmingPlan:
        """The single plan equal to applying `self` and then `later` (whose indices count the slimmed channels)."""
        merged = {p.group.name: p for p in self.groups}
        for step in later.groups:
            first = merged.get(step.group.name)
            if first is None:
                merged[step.group.name] = step
                continue
            if step.group.size != first.width:
                raise ValueError(f"Group {step.group.name!r}: the second plan expects {step.group.size} channels, the "
                                 f"first leaves {first.width}.")
            own = first.clusters or [[k] for k in first.keep]
            members = step.clusters or [[k] for k in step.keep]
            clusters = [sorted(i for k in cluster for i in own[k]) for cluster in members]
            keep = [first.keep[k] for k in step.keep]
            explicit = first.clusters is not None or step.clusters is not None
            merged[step.group.name] = GroupPlan(first.group, keep, clusters if explicit else None)
        return SlimmingPlan(list(merged.values()), later.round_to or self.round_to, later.method or self.method,
                            self.base_model or later.base_model, {**self.metadata, **later.metadata})


def plan_from_widths(model: nn.Module, groups: Sequence[ChannelGroup], widths: Mapping[str, int], *,
                     scores: Mapping[str, torch.Tensor] | None = None, round_to: int | str | None = None,
                     method: str | None = None, device: str | torch.device | None = None) -> SlimmingPlan:
    """Keeps, per group, the `widths[name]` channels with the largest score (magnitude pruning).

    Args:
        model: the unslimmed model.
        groups: its channel groups (`find_channel_groups`).
        widths: `{group name: width}`.
        scores: per-group channel scores (default: `l1_scores`, the L1 norm of the producers' output rows).
        round_to: widths are first rounded *up* to a multiple of this int (never above the group size); `"auto"`:
            `aligned_multiple(device)` (8 on CUDA). Rounding up adds FLOPs: to keep a FLOPs budget choose the widths
            with the same `round_to` (`widths_for_flops`), so they are multiples already.
        method: recorded in the plan.
        device: where the slimmed model will run, for `round_to="auto"` (default: the device of `model`).

    Returns:
        The validated `SlimmingPlan` (its `round_to` is the resolved multiple).

    Raises:
        ValueError: unknown group names, a width outside [1, group size], or a bad `round_to`.
    """
    round_to = width_multiple(round_to, model, device)
    by_name = {g.name: g for g in groups}
    unknown = set(widths) - set(by_name)
    if unknown:
        raise ValueError(f"Unknown channel groups {sorted(unknown)}; known: {sorted(by_name)}.")
    plans = []
    for name, width in widths.items():
        group = by_name[name]
        width = _round_to(int(width), round_to, group.size)
        if not 1 <= width <= group.size:
            raise ValueError(f"Group {name!r}: width {width} outside [1, {group.size}].")
        score = scores[name] if scores is not None and name in scores else l1_scores(model, group)
        keep = sorted(torch.argsort(score.float(), descending=True, stable=True)[:width].tolist())
        plans.append(GroupPlan(group, keep))
    plan = SlimmingPlan(plans, round_to, method)
    plan.validate()
    return plan


def l1_scores(model: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """Sum over producers of the L1 norm of each output channel's weights."""
    total = torch.zeros(group.size)
    for path, _ in group.producers:
        weight = model.get_submodule(path).weight.detach()
        total += weight.abs().reshape(weight.shape[0], -1).sum(1).float().cpu()
    return total
