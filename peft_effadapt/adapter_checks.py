"""Checks shared by every tuner and config: the adapter tensors in a file must be exactly the ones the config builds,
config fields must have the types their annotations name, and a safe merge either merges every layer or none.

peft's own loader reports shape mismatches as a generic `RuntimeError` and missing tensors only as a warning, after
the adapter was injected. `ValidatedLoadMixin` checks first and, on a mismatch, removes the half-loaded adapter again
so that the user's model is as it was before the call.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
import warnings

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
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


FILE_KEYS_ATTR = "_peft_effadapt_file_keys"


def check_saved_modules_complete(model: nn.Module, config) -> None:
    """Before injection, for a config just read by ``from_pretrained`` (which records the file's tensor names once):
    every module of the model that ``modules_to_save`` selects must find all its tensors in the file. peft would
    otherwise inject the adapter and then fail with a bare KeyError, leaving the model modified."""
    recorded = config.__dict__.pop(FILE_KEYS_ATTR, None)
    if recorded is None:
        return
    names, keys, weights = recorded
    if tuple(config.modules_to_save or ()) != names or not names:
        return  # the config was edited after loading: nothing recorded applies
    for module_name, module in model.named_modules():
        if not module_name or not any(module_name == n or module_name.endswith("." + n) for n in names):
            continue
        if isinstance(module, ModulesToSaveWrapper):  # wrapped already by an earlier adapter: its own tensors
            module = module.original_module
        missing = [f"{module_name}.{key}" for key in module.state_dict()
                   if f"base_model.model.{module_name}.{key}" not in keys and f"{module_name}.{key}" not in keys]
        if missing:
            raise ValueError(
                f"Adapter weights file {weights} lacks tensors of '{module_name}' (in modules_to_save): "
                f"{missing[:5]}. The file is damaged or was saved from another model."
            )


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


def _clone_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


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
    peft loads them, and make ``safe_merge=True`` all-or-nothing (peft merges layer by layer, so a non-finite delta in
    a late layer would otherwise leave the earlier layers merged, or merged and unloaded). A safe merge keeps a copy
    of the adapted layers' base weights until every layer has merged, and restores them bit for bit on failure."""

    method_name: str

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        check_saved_modules_complete(model, self.peft_config[adapter_name])
        super().inject_adapter(model, adapter_name, *args, **kwargs)

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        if not safe_merge:
            return super().merge_adapter(adapter_names=adapter_names, safe_merge=False)
        layers = [m for m in self.model.modules() if isinstance(m, BaseTunerLayer)]
        saved = [(layer, list(layer.merged_adapters), _clone_state(layer.get_base_layer())) for layer in layers]
        try:
            super().merge_adapter(adapter_names=adapter_names, safe_merge=True)
        except Exception:
            for layer, merged_before, state in saved:  # undo the layers merged before the failing one, bit for bit
                if list(layer.merged_adapters) != merged_before:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        if layer.merged:
                            layer.unmerge()
                        if merged_before:
                            layer.merge(adapter_names=merged_before)
                    layer.get_base_layer().load_state_dict(state, strict=False)
            raise

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        if merge and safe_merge:
            self.merge_adapter(adapter_names=adapter_names, safe_merge=True)  # raises with every layer unmerged
            with warnings.catch_warnings():  # peft warns per layer that the adapters are merged already
                warnings.filterwarnings("ignore", message=".*[Aa]lready .*merged")
                return super()._unload_and_optionally_merge(
                    merge=True, progressbar=progressbar, safe_merge=True, adapter_names=adapter_names
                )
        return super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        try:
            check_adapter_tensors(model, adapter_name, state_dict, cls.tuner_layer_cls, cls.prefix, cls.method_name)
            remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
            check_loaded_like_model(model, remapped, cls.method_name)
        except ValueError:
            undo_injection(model, adapter_name)
            raise
        return remapped


# -- config fields --------------------------------------------------------------------------------------------------
_INT64 = 2**63


def check_config_fields(config) -> None:
    """Every dataclass field of a config whose value differs from its default must match its type annotation: bools
    are bools, ints are ints within int64, floats are finite numbers, strings are strings, ``Literal`` values are
    among the allowed ones, lists hold elements of the named type. Raises ValueError naming the field, the expected
    type and the value (shortened), so that a hand-edited or hostile adapter_config.json fails before any model is
    touched. Annotations this check does not understand are skipped."""
    cls = type(config)
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - an annotation we cannot resolve: nothing to check against
        return
    for field in dataclasses.fields(cls):
        hint = hints.get(field.name)
        value = getattr(config, field.name, None)
        if hint is None or _is_default(field, value) or _matches(value, hint):
            continue
        raise ValueError(
            f"{cls.__name__}.{field.name} must be {_describe(hint)}, got {_short_repr(value)} "
            f"({type(value).__name__})."
        )


def _is_default(field: dataclasses.Field, value) -> bool:
    if field.default is not dataclasses.MISSING:
        default = field.default
    elif field.default_factory is not dataclasses.MISSING:
        default = field.default_factory()
    else:
        return False
    try:
        return value is default or (type(value) is type(default) and bool(value == default))
    except Exception:  # noqa: BLE001 - values without a usable ==
        return False


def _matches(value, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any:
        return True
    if hint is type(None) or hint is None:
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if origin is typing.Literal:
        return any(value == arg and type(value) is type(arg) for arg in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool) and -_INT64 <= value < _INT64
    if hint is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return False
        try:
            return math.isfinite(float(value))
        except OverflowError:
            return False
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, set, frozenset) or hint in (list, tuple, set):
        if not isinstance(value, (list, tuple, set, frozenset)):
            return False
        if not args or origin is tuple:
            return True
        return all(_matches(item, args[0]) for item in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return isinstance(value, hint) or (isinstance(value, str) and issubclass(hint, str))
    return True  # a class or construct we do not check


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(arg) for arg in args)
    if hint is type(None):
        return "None"
    if hint is int:
        return "an int (within int64)"
    if hint is float:
        return "a finite number"
    if origin in (list, tuple, set):
        return f"a list of {_describe(args[0])}" if args else "a list"
    return getattr(hint, "__name__", str(hint))


def _short_repr(value, limit: int = 80) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**40:
        return f"an int of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
