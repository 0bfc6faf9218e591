"""Helpers every tuner uses to find and describe modules of the user's model."""

from __future__ import annotations

from collections.abc import Iterator

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
