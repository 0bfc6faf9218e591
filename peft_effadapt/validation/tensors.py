"""Load-time tensor checks: an adapter file against the model it is loaded into, before and during peft's load.

peft's own loader reports shape mismatches as a generic `RuntimeError` and missing tensors only as a warning, after
the adapter was injected; these checks raise ValueError naming the layer and the shapes instead.
"""

from __future__ import annotations

import torch
from peft.utils import ModulesToSaveWrapper
from torch import nn

from ..targeting import unwrap_to_tuner_layers
from .files import AdapterFile


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
                expected[".".join(parts[:1] + parts[2:])] = (tuple(param.shape), param.dtype)
        missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        if missing or extra:
            raise ValueError(
                f"The {method} adapter file does not match layer '{name}': missing tensors {missing or 'none'}, "
                f"unexpected tensors {extra or 'none'}. The file is damaged or its adapter_config.json does not "
                "describe it."
            )
        for key, (shape, dtype) in expected.items():
            if found[key].is_floating_point() != dtype.is_floating_point:
                raise ValueError(
                    f"{key} of layer '{name}' is stored as {found[key].dtype} in the {method} adapter file, but the "
                    f"layer holds {dtype} values: the file is damaged or was not written by this method."
                )
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


def check_saved_modules_complete(model: nn.Module, config, adapter_file: AdapterFile) -> None:
    """Before injection: every module of the model that ``modules_to_save`` selects must find all its tensors in the
    file. peft would otherwise inject the adapter and then fail with a bare KeyError, leaving the model modified."""
    names = tuple(name for name in (config.modules_to_save or ()) if isinstance(name, str))
    for module_name, module in model.named_modules():
        if not module_name or not any(module_name == n or module_name.endswith("." + n) for n in names):
            continue
        if isinstance(module, ModulesToSaveWrapper):  # wrapped already by an earlier adapter: its own tensors
            module = module.original_module
        keys = adapter_file.tensors
        missing = [f"{module_name}.{key}" for key in module.state_dict()
                   if f"base_model.model.{module_name}.{key}" not in keys and f"{module_name}.{key}" not in keys]
        if missing:
            raise ValueError(
                f"Adapter weights file {adapter_file.path} lacks tensors of '{module_name}' (in modules_to_save): "
                f"{missing[:5]}. The file is damaged or was saved from another model."
            )


def check_file_fits_model(expected: dict[str, tuple[tuple[int, ...], bool]], adapter_file: AdapterFile, prefix: str,
                          method: str) -> None:
    """Compares the file with ``expected``: key -> (shape, floating point) of every tensor that saving this adapter
    from the model about to receive it would write (keys without ``base_model.model.``). Raises ValueError naming the
    layer and both shapes on the first difference, or the layers one side has and the other lacks (a model of another
    width, depth or family)."""
    found = {key.removeprefix("base_model.model."): saved for key, saved in adapter_file.tensors.items()}
    where = f"The {method} adapter file {adapter_file.path} does not fit this model"
    for key in sorted(expected.keys() & found.keys()):
        (shape, is_float), saved = expected[key], found[key]
        layer, tensor = _split_key(key, prefix)
        if saved.shape != shape:
            raise ValueError(
                f"{where}: layer '{layer}' needs {tensor} of shape {shape}, the file holds shape {saved.shape}. The "
                "adapter was saved from a model of another width or family; load it into that model."
            )
        if saved.is_floating_point != is_float:
            raise ValueError(
                f"{where}: layer '{layer}' needs {tensor} as {'floating point' if is_float else 'integer'} values, "
                f"the file holds {saved.dtype}. The file is damaged or was not written by this method."
            )
    extra, missing = sorted(found.keys() - expected.keys()), sorted(expected.keys() - found.keys())
    if extra:
        layers = sorted({_split_key(key, prefix)[0] for key in extra})
        raise ValueError(
            f"{where}: it holds tensors for layers this model does not have or adapt: {layers[:5]}"
            f"{' ...' if len(layers) > 5 else ''} (e.g. {extra[0]} of shape {found[extra[0]].shape}). The adapter "
            "was saved from a deeper model or another family."
        )
    if missing:
        layers = sorted({_split_key(key, prefix)[0] for key in missing})
        raise ValueError(
            f"{where}: it lacks tensors for layers of this model: {layers[:5]}{' ...' if len(layers) > 5 else ''} "
            f"(e.g. {missing[0]} of shape {expected[missing[0]][0]}). The adapter was saved from a shallower model or "
            "another family."
        )


def _split_key(key: str, prefix: str) -> tuple[str, str]:
    """('vit.layers.0.attention.q_proj', 'consolidator_delta') for an adapter key; (module, tensor) otherwise."""
    layer, marker, rest = key.partition("." + prefix)
    if marker:
        return layer, prefix + rest
    module, _, tensor = key.rpartition(".")
    return module, tensor


def check_loaded_like_model(model: nn.Module, state_dict: dict[str, torch.Tensor], method: str) -> None:
    """Every tensor about to be copied into the model (adapter tensors and modules_to_save copies alike) must have the
    shape of its target and be floating point exactly when the target is: peft would otherwise cast integers into
    float weights silently, or fail with a size-mismatch RuntimeError after the adapter was injected."""
    targets = model.state_dict()
    for key, value in state_dict.items():
        target = targets.get(key)
        if target is None:
            continue
        name = key.removeprefix("base_model.model.")
        if value.is_floating_point() != target.is_floating_point():
            raise ValueError(
                f"Tensor '{name}' is stored as {value.dtype} in the {method} adapter file, but the model holds "
                f"{target.dtype} values there: the file is damaged or was not written for this model."
            )
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(
                f"Tensor '{name}' has shape {tuple(value.shape)} in the {method} adapter file, but the model needs "
                f"{tuple(target.shape)}: the file belongs to another model or config."
            )
