"""Physical channel removal: slices convs, BatchNorms, linears and per-channel parameters (layer scales) by a
`SlimmingPlan` and updates the modules' attributes.

The whole plan is checked against the model and every new tensor is computed before the first module is touched, so
a bad plan leaves the model exactly as it was. HF config width fields (`hidden_sizes`, `intermediate_size`, ...) stay
at the original values: one number per config cannot describe per-layer widths, and the stock class must be built
with the original structure (shortcuts where they were) before `load_slimmed` replays the plan.
"""

from __future__ import annotations

import torch
from torch import nn

from .plan import GroupPlan, SlimmingPlan

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_RECORD = "_peft_effadapt_slimming_plan"


def applied_plan(model: nn.Module) -> SlimmingPlan | None:
    """The combined plan of every `apply_plan` call on this model (None if never slimmed)."""
    return model.__dict__.get(_RECORD)


def apply_plan(model: nn.Module, plan: SlimmingPlan) -> nn.Module:
    """Slims `model` in place by `plan` and returns it. Raises `ValueError` naming the module and the shape found
    (the model untouched) when the plan does not fit."""
    plan.validate()
    new_tensors, new_attrs = _compute(model, plan)
    with torch.no_grad():
        for (path, name), value in new_tensors.items():
            module = model.get_submodule(path)
            old = getattr(module, name)
            if isinstance(old, nn.Parameter):
                setattr(module, name, nn.Parameter(value, requires_grad=old.requires_grad))
            else:
                setattr(module, name, value)
        for path, attrs in new_attrs.items():
            module = model.get_submodule(path)
            for key, value in attrs.items():
                setattr(module, key, value)
    previous = applied_plan(model)
    model.__dict__[_RECORD] = plan if previous is None else previous.then(plan)
    return model


def _module(model: nn.Module, path: str, group: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise ValueError(f"Slimming plan group {group!r} names module {path!r}, which {type(model).__name__} does "
                         "not have.") from None


def _compute(model: nn.Module, plan: SlimmingPlan):
    out_edit: dict[str, tuple[GroupPlan, str]] = {}
    in_edit: dict[str, GroupPlan] = {}
    norm_edit: dict[str, GroupPlan] = {}
    param_edit: dict[str, GroupPlan] = {}
    for gp in plan.groups:
        group = gp.group
        if not group.prunable:
            raise ValueError(f"Group {group.name!r} cannot be slimmed: it {group.refusal}"
                             f"{' (slimming it would change the output shape)' if group.reaches_output else ''}.")
        for path, kind in group.producers:
            module = _module(model, path, group.name)
            if path in out_edit:
                raise ValueError(f"Module {path!r} produces channels of two groups ({out_edit[path][0].group.name!r},"
                                 f" {group.name!r}).")
            _check_producer(path, module, kind, group.size)
            out_edit[path] = (gp, kind)
        for path in group.norms:
            module = _module(model, path, group.name)
            if not isinstance(module, _NORMS) or module.num_features != group.size:
                raise ValueError(f"Group {group.name!r}: norm {path!r} should be a BatchNorm over {group.size} "
                                 f"channels, found {module}.")
            norm_edit[path] = gp
        for path in group.consumers:
            module = _module(model, path, group.name)
            if path in in_edit:
                raise ValueError(f"Module {path!r} reads channels of two groups.")
            _check_consumer(path, module, group.size)
            in_edit[path] = gp
        for fqn in group.channel_params:
            _channel_axis(model, fqn, group)
            param_edit[fqn] = gp

    tensors: dict[tuple[str, str], torch.Tensor] = {}
    attrs: dict[str, dict] = {}
    with torch.no_grad():
        for path in dict.fromkeys([*out_edit, *in_edit]):
            module = model.get_submodule(path)
            weight = module.weight.detach()
            bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
            new = attrs.setdefault(path, {})
            if path in out_edit:
                gp, kind = out_edit[path]
                index = torch.tensor(gp.keep, device=weight.device)
                weight = weight.index_select(0, index)
                bias = bias.index_select(0, index) if bias is not None else None
                if isinstance(module, nn.Linear):
                    new["out_features"] = gp.width
                else:
                    new["out_channels"] = gp.width
                    if kind == "depthwise":
                        new.update(in_channels=gp.width, groups=gp.width)
            if path in in_edit:
                gp = in_edit[path]
                weight = _merge_inputs(weight, gp, module)
                if isinstance(module, nn.Linear):
                    new["in_features"] = weight.shape[1]
                else:
                    new["in_channels"] = gp.width
            tensors[(path, "weight")] = weight.clone()
            if bias is not None:
                tensors[(path, "bias")] = bias.clone()
        for path, gp in norm_edit.items():
            module = model.get_submodule(path)
            index = torch.tensor(gp.keep, device=module.running_mean.device if module.running_mean is not None
                                 else module.weight.device)
            for name in ("weight", "bias", "running_mean", "running_var"):
                value = getattr(module, name, None)
                if value is not None:
                    tensors[(path, name)] = value.detach().index_select(0, index).clone()
            attrs[path] = {"num_features": gp.width}
        for fqn, gp in param_edit.items():
            path, _, name = fqn.rpartition(".")
            value, axis = _channel_axis(model, fqn, gp.group)
            if (path, name) in tensors:
                raise ValueError(f"{fqn!r} is both a module weight and a per-channel parameter of {gp.group.name!r}.")
            index = torch.tensor(gp.keep, device=value.device)
            tensors[(path, name)] = value.detach().index_select(axis, index).clone()
    return tensors, attrs


def _channel_axis(model: nn.Module, fqn: str, group) -> tuple[torch.Tensor, int]:
    """A per-channel tensor of `group` and its channel axis (its one dim of the group's size, all others 1)."""
    path, _, name = fqn.rpartition(".")
    value = getattr(_module(model, path, group.name), name, None)
    axes = [i for i, n in enumerate(value.shape) if n != 1] if isinstance(value, torch.Tensor) else None
    if axes is None or value.numel() != group.size or len(axes) > 1:
        raise ValueError(f"Group {group.name!r}: {fqn!r} should hold one value per channel ({group.size}), found "
                         f"{type(value).__name__ if axes is None else tuple(value.shape)}.")
    return value, axes[0] if axes else 0


def _check_producer(path: str, module: nn.Module, kind: str, size: int) -> None:
    if kind == "linear":
        ok, found = isinstance(module, nn.Linear) and module.out_features == size, "Linear"
    elif kind == "conv":
        ok, found = isinstance(module, _CONVS) and module.out_channels == size, "conv"
    elif kind == "depthwise":
        ok = isinstance(module, _CONVS) and module.groups == module.in_channels == module.out_channels == size
        found = "depthwise conv"
    else:
        raise ValueError(f"Unknown producer kind {kind!r} for {path!r}; expected conv, linear or depthwise.")
    if not ok:
        raise ValueError(f"Producer {path!r} should be a {found} with {size} output channels, found {module}.")


def _check_consumer(path: str, module: nn.Module, size: int) -> None:
    if isinstance(module, nn.Linear):
        if module.in_features % size:
            raise ValueError(f"Consumer {path!r} has {module.in_features} input features, not a multiple of the "
                             f"group's {size} channels.")
    elif isinstance(module, _CONVS):
        if module.groups != 1 or module.in_channels != size:
            raise ValueError(f"Consumer {path!r} should be an ungrouped conv with {size} input channels, found "
                             f"{module}.")
    else:
        raise ValueError(f"Consumer {path!r} should be a conv or Linear, found {type(module).__name__}.")


def _merge_inputs(weight: torch.Tensor, gp: GroupPlan, module: nn.Module) -> torch.Tensor:
    """Input slices of the kept channels; with clusters, the sum over each cluster (C-SGD's trim). A Linear after a
    flatten owns `in_features // size` contiguous features per channel."""
    size = gp.group.size
    blocks = weight.reshape(weight.shape[0], size, -1)
    if gp.clusters is None:
        merged = blocks.index_select(1, torch.tensor(gp.keep, device=weight.device))
    else:
        merged = torch.stack([blocks[:, members].sum(1) for members in gp.clusters], 1)
    if isinstance(module, nn.Linear):
        return merged.reshape(weight.shape[0], -1)
    return merged.reshape(weight.shape[0], gp.width, *weight.shape[2:])
