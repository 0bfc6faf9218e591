"""Load-time checks shared by every tuner: the adapter tensors in a file must be exactly the ones the config builds.

peft's own loader reports shape mismatches as a generic `RuntimeError` and missing tensors only as a warning, after
the adapter was injected. `ValidatedLoadMixin` checks first and, on a mismatch, removes the half-loaded adapter again
so that the user's model is as it was before the call.
"""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import ModulesToSaveWrapper
from torch import nn

from .targeting import unwrap_to_tuner_layers


def check_adapter_tensors(model: nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor],
                          layer_cls: type, prefix: str, method: str) -> None:
    """Every tuner layer must find exactly its adapter tensors (keys without the adapter name) with the shapes its
    config implies, and the file may hold no tensors for other modules. Raises ValueError naming the first mismatch."""
    marker = "." + prefix
    by_layer: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if marker in key:
            layer_name, _, rest = key.removeprefix("base_model.model.").partition(marker)
            by_layer.setdefault(layer_name, {})[prefix + rest] = value
    for name, layer in unwrap_to_tuner_layers(model, layer_cls):
        name = name.removeprefix("base_model.model.")
        found = by_layer.pop(name, {})
        expected = {}
        for key, param in layer.named_parameters():
            parts = key.split(".")
            if parts[0].startswith(prefix) and len(parts) > 1 and parts[1] == adapter_name:
                expected[".".join(parts[:1] + parts[2:])] = tuple(param.shape)
        missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        if missing or extra:
            raise ValueError(
                f"The {method} adapter file does not match layer '{name}': missing tensors {missing or 'none'}, "
                f"unexpected tensors {extra or 'none'}. The file is damaged or its adapter_config.json does not "
                "describe it."
            )
        for key, shape in expected.items():
            if tuple(found[key].shape) != shape:
                raise ValueError(
                    f"{key} of layer '{name}' has shape {tuple(found[key].shape)} in the {method} adapter file, but "
                    f"the adapter config needs {shape}: the file and its adapter_config.json disagree, or the file "
                    "targets another model."
                )
    if by_layer:
        unknown = sorted(by_layer)
        raise ValueError(
            f"The {method} adapter file has tensors for modules the model does not adapt: {unknown[:5]}"
            f"{' ...' if len(unknown) > 5 else ''}. It belongs to another model or config."
        )


def undo_injection(model: nn.Module, adapter_name: str) -> None:
    """Removes an adapter whose load failed, so that the user's model is as it was before the call."""
    tuner = getattr(model, "base_model", None)
    if not isinstance(tuner, BaseTuner):
        return
    if list(tuner.peft_config) == [adapter_name]:
        for module in tuner.model.modules():
            if isinstance(module, ModulesToSaveWrapper):
                module.set_adapter([])  # unload then hands back the original module, not the copy
        tuner.unload()
        tuner.peft_config.pop(adapter_name, None)
    else:
        tuner.delete_adapter(adapter_name)
        getattr(model, "peft_config", {}).pop(adapter_name, None)


class ValidatedLoadMixin:
    """For BaseTuner subclasses with `prefix`, `tuner_layer_cls` and `method_name`: check the file's tensors before
    peft loads them."""

    method_name: str

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        try:
            check_adapter_tensors(model, adapter_name, state_dict, cls.tuner_layer_cls, cls.prefix, cls.method_name)
        except ValueError:
            undo_injection(model, adapter_name)
            raise
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
