"""Slimming plans: which channels of each group survive, as JSON beside `model.safetensors`, and the save/load pair
that rebuilds the exact slimmed architecture.

A plan lists, per channel group, the kept channel indices `keep` (in the original numbering). C-SGD's trim also gives
`clusters`: `keep[i]` stands for every member of `clusters[i]`, and each consumer's input slices of all members are
summed into the kept slice (exact when the members' outputs are identical). Plans hold the group definitions (module
paths), so replaying one needs no tracing: `load_slimmed` builds the stock model from `config.json`, applies the plan
to it, checks every tensor shape against `model.safetensors` and only then loads strictly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .flops import round_to as _round_to
from .groups import ChannelGroup

PLAN_NAME = "slimming_plan.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1
CONFIG_MIRROR = "peft_effadapt_slimming"


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
        from .. import __version__

        return {
            "format_version": FORMAT_VERSION,
            "library": "peft_effadapt",
            "library_version": __version__,
            "method": self.method,
            "base_model": self.base_model,
            "round_to": self.round_to,
            "metadata": self.metadata,
            "groups": [{**p.group.to_dict(), "keep": list(p.keep), "width": p.width,
                        "clusters": p.clusters} for p in self.groups],
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> SlimmingPlan:
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"Unsupported slimming plan format_version {version!r} (this library reads "
                             f"{FORMAT_VERSION}).")
        groups = []
        for entry in data["groups"]:
            entry = dict(entry)
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
        return cls.from_dict(json.loads(path.read_text()))

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
                     scores: Mapping[str, torch.Tensor] | None = None, round_to: int | None = None,
                     method: str | None = None) -> SlimmingPlan:
    """Keeps, per group, the `widths[name]` channels with the largest score (default: L1 norm of the producers'
    output rows, summed over the group's producers — magnitude pruning). With `round_to`, widths are first rounded up
    to a multiple (never above the group size)."""
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


# ------------------------------------------------------------------------------------------------- save / load
def save_slimmed(model: nn.Module, plan: SlimmingPlan | None, directory: str | os.PathLike) -> Path:
    """Writes `model.safetensors` (+ `config.json` for HF models, which also gets a short mirror of the plan under
    `peft_effadapt_slimming`) and `slimming_plan.json`. `plan=None` uses the plan recorded by `apply_plan`."""
    from safetensors.torch import save_file

    from .surgery import applied_plan

    recorded = applied_plan(model)
    if plan is None:
        if recorded is None:
            raise ValueError("The model carries no applied slimming plan: pass the plan or slim it with apply_plan.")
        plan = recorded
    elif recorded is not None and plan.to_dict()["groups"] != recorded.to_dict()["groups"]:
        raise ValueError("The plan passed differs from the one applied to this model (several rounds?); pass "
                         "plan=None to save the combined plan that apply_plan recorded.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "save_pretrained"):
        setattr(config, CONFIG_MIRROR, {"plan_file": PLAN_NAME, "method": plan.method, "widths": plan.widths})
        if not getattr(config, "architectures", None):
            config.architectures = [type(model).__name__]
        config.save_pretrained(directory)
    # The live module names are written as they are (transformers' save_pretrained may rename keys to an older
    # layout, e.g. ViT's encoder.layer.N.intermediate.dense); tied tensors are stored as copies.
    state, seen = {}, set()
    for key, value in model.state_dict().items():
        value = value.detach().cpu().contiguous()
        pointer = (value.untyped_storage().data_ptr(), value.storage_offset()) if value.numel() else None
        state[key] = value.clone() if pointer in seen else value
        seen.add(pointer)
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    plan.save(directory)
    return directory


def load_slimmed(directory: str | os.PathLike, model_class=None, *, revision: str | None = None,
                 **kwargs) -> nn.Module:
    """Rebuilds the slimmed model saved by `save_slimmed` (a folder, or a Hub repo id pushed with
    `peft_effadapt.hub.push_slimmed_model_to_hub`): the stock architecture from `config.json` (class from
    `config.architectures` unless `model_class` is given), the plan applied, every tensor shape checked against
    `model.safetensors`, then a strict load. For plain torch models pass `model_class` as a zero-argument factory
    of the unslimmed model. Returns the model in eval mode; raises before loading anything if plan and weights do
    not match. `ignore_mismatched_sizes` is refused (it would re-initialise pruned layers silently)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .surgery import apply_plan

    if kwargs.pop("ignore_mismatched_sizes", False):
        raise ValueError("load_slimmed refuses ignore_mismatched_sizes=True: mismatched tensors mean the plan does not "
                         "describe these weights, and re-initialising them would silently destroy the model.")
    if kwargs:
        raise TypeError(f"load_slimmed got unexpected arguments {sorted(kwargs)}.")
    if not Path(directory).is_dir():
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import EntryNotFoundError

        repo_id, files = str(directory), {}
        for name in (PLAN_NAME, WEIGHTS_NAME, "config.json"):
            try:
                files[name] = hf_hub_download(repo_id, name, revision=revision)
            except EntryNotFoundError:
                if name != "config.json":
                    raise
        directory = Path(files[PLAN_NAME]).parent
    directory = Path(directory)
    plan = SlimmingPlan.load(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"No {WEIGHTS_NAME} in {directory}.")
    model = _build(directory, model_class)
    apply_plan(model, plan)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with safe_open(str(weights), framework="pt") as handle:
        stored = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}  # noqa: SIM118
    problems = [f"missing {k} {s}" for k, s in expected.items() if k not in stored]
    problems += [f"unexpected {k} {s}" for k, s in stored.items() if k not in expected]
    problems += [f"{k}: weights {stored[k]} vs plan {s}" for k, s in expected.items() if k in stored and stored[k] != s]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... ({len(problems)} in all)" if len(problems) > 8 else "")
        raise ValueError(f"{PLAN_NAME} in {directory} does not match {WEIGHTS_NAME}: {shown}.")
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model.eval()


def _build(directory: Path, model_class) -> nn.Module:
    config_path = directory / "config.json"
    if not config_path.is_file():
        if model_class is None:
            raise ValueError(f"{directory} has no config.json: pass model_class, a factory of the unslimmed model.")
        return model_class()
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(directory)
    if hasattr(config, CONFIG_MIRROR):
        delattr(config, CONFIG_MIRROR)
    if model_class is None:
        names = getattr(config, "architectures", None) or []
        if not names or not hasattr(transformers, names[0]):
            raise ValueError(f"config.json in {directory} names no known architecture ({names}); pass model_class.")
        model_class = getattr(transformers, names[0])
    torch_dtype = getattr(config, "dtype", None)
    model = model_class(config)
    if isinstance(torch_dtype, torch.dtype):
        model = model.to(torch_dtype)
    return model
