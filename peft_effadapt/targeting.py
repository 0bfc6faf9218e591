"""Helpers every tuner uses to find and describe modules of the user's model."""

from __future__ import annotations

from collections.abc import Iterator

from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from torch import nn


def model_type_of(model: nn.Module) -> str | None:
    """The transformers ``model_type`` of a model (or of the model a PeftModel/BaseTuner wraps), else None."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def candidate_names(model: nn.Module, module_type: type[nn.Module], limit: int = 12) -> str:
    """A short, de-duplicated list of the leaf names of ``module_type`` modules, to put in error messages."""
    leaves: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, module_type) and name:
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in leaves:
                leaves.append(leaf)
    shown = ", ".join(leaves[:limit]) or "none"
    return shown + (f", ... ({len(leaves)} distinct names)" if len(leaves) > limit else "")


def unwrap_to_tuner_layers(model: nn.Module, layer_cls: type) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every module of ``model`` that is an instance of ``layer_cls``."""
    for name, module in model.named_modules():
        if isinstance(module, layer_cls):
            yield name, module


def targeted_modules(
    model: nn.Module, config, prefix: str, accepted: type | tuple[type, ...], method: str, what: str
) -> list[tuple[str, nn.Module, nn.Module]]:
    """(name, module, base layer) of every module ``config.target_modules`` matches, skipping the adapter's own
    sub-modules (``.<prefix>``) and wrapped base layers; TypeError naming the first match whose base layer is not
    ``accepted`` (``f"{method} {what}, but target_modules=... matched ..."``)."""
    matched = []
    for name, module in model.named_modules():
        if not name or f".{prefix}" in name or ".base_layer" in name or not check_target_module_exists(config, name):
            continue
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        if not isinstance(base, accepted):
            raise TypeError(
                f"{method} {what}, but target_modules={config.target_modules!r} matched '{name}' "
                f"({type(base).__name__})."
            )
        matched.append((name, module, base))
    return matched

