"""Every place where peft_effadapt relies on peft internals; the file to read when peft changes.

Written against peft 0.21. Each hook says which peft behaviour it relies on:

1. `add_peft_type` adds members to peft's closed ``PeftType`` str-enum, the way the enum machinery creates them.
2. `register_peft_method` wraps peft's public function of that name: idempotent, and refusing prefixes that overlap.
3. `guard_config_reader` wraps ``PeftConfigMixin.from_json_file`` so that a damaged or hostile adapter_config.json,
   or one with unknown fields, is a ValueError naming the file (and the field); unknown fields that a newer
   peft_effadapt wrote are dropped with one warning.
4. `VerifiedAdapterFilesMixin` (configs) hooks ``PeftConfig.__post_init__``, ``to_dict`` and ``from_pretrained``.
5. `ValidatedLoadMixin` (tuners) overrides ``BaseTuner.inject_adapter``, ``merge_adapter`` and the private
   ``_unload_and_optionally_merge`` and ``_remap_adapter_state_dict_for_load``.

The checks themselves live in `peft_effadapt.validation`; this module only decides when peft runs them. Method-
specific overrides of peft's tuner hooks (``_create_and_replace``, ``_replace_module``, ``_get_adapter_state_dict``)
stay with their tuner.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import os
import sys
import warnings
from dataclasses import dataclass, field

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import ModulesToSaveWrapper, PeftType, get_peft_model_state_dict
from peft.utils import register_peft_method as _peft_register_peft_method
from torch import nn

from .validation import (
    VERSION_KEY,
    check_adapter_tensors,
    check_config_fields,
    check_file_fits_model,
    check_known_fields,
    check_loaded_like_model,
    check_saved_module_keys,
    check_saved_modules_complete,
    installed_version,
    newer_fields_warning,
    read_adapter_file,
    read_config_json,
    writer_version,
)


# -- 1. PeftType members ------------------------------------------------------------------------------------------
def add_peft_type(name: str) -> PeftType:
    """Adds ``name`` as a member of ``peft.utils.PeftType`` (value == name) and returns it.

    Relies on peft 0.21's ``PeftType`` being a plain ``(str, enum.Enum)``: members are created like ``EnumType`` does
    (``_add_member_`` from Python 3.13, the member maps before). Returns the existing member when it is already there
    with the same value; raises ``ValueError`` when the name exists with another value or the value is taken.
    """
    if not name.isidentifier() or not name.isupper():
        raise ValueError(f"PEFT type names must be upper-case identifiers, got {name!r}.")
    existing = PeftType.__members__.get(name)
    if existing is not None:
        if existing.value != name:
            raise ValueError(f"PeftType.{name} already exists with value {existing.value!r}, expected {name!r}.")
        return existing
    if name in PeftType._value2member_map_:
        other = PeftType._value2member_map_[name]
        raise ValueError(f"PeftType value {name!r} is already used by PeftType.{other.name}.")

    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    if sys.version_info >= (3, 13):
        PeftType._add_member_(name, member)
    else:
        # Enum's metaclass refuses setattr for existing members only; a new name goes through type.__setattr__.
        type.__setattr__(PeftType, name, member)
        PeftType._member_map_[name] = member
    PeftType._member_names_.append(name)
    PeftType._value2member_map_[name] = member
    return member


# -- 2. registration ----------------------------------------------------------------------------------------------
def register_peft_method(*, name: str, config_cls: type, model_cls: type) -> None:
    """peft's ``register_peft_method`` for this package's tuners; each tuner calls it from its own ``__init__``.

    Relies on peft 0.21 resolving a saved ``peft_type`` purely through ``PEFT_TYPE_TO_CONFIG/TUNER/PREFIX_MAPPING``
    and on transformers deriving the prefix as ``peft_type.lower() + "_"``, so ``model_cls.prefix`` must be
    ``name + "_"``. Unlike peft's function it is idempotent (re-import, module reload), refuses a conflicting
    registration with a ValueError, and checks the prefix against the registered *values* (peft matches adapter keys
    by the prefix, so a prefix starting with another would load foreign tensors).
    """
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    prefix = f"{name}_"
    if getattr(model_cls, "prefix", None) != prefix:
        raise ValueError(f"{model_cls.__name__}.prefix must be {prefix!r}, got {getattr(model_cls, 'prefix', None)!r}.")
    member = PeftType.__members__.get(name.upper())
    registered_config = PEFT_TYPE_TO_CONFIG_MAPPING.get(member) if member is not None else None
    registered_model = PEFT_TYPE_TO_TUNER_MAPPING.get(member) if member is not None else None
    if registered_config is not None or registered_model is not None:
        if _same_class(registered_config, config_cls) and _same_class(registered_model, model_cls):
            # Same classes (or the same classes re-created by a module reload): point peft at the newest objects.
            PEFT_TYPE_TO_CONFIG_MAPPING[member] = config_cls
            PEFT_TYPE_TO_TUNER_MAPPING[member] = model_cls
            return
        raise ValueError(
            f"PEFT type {member.value} is already registered with {registered_config!r}/{registered_model!r}; "
            f"refusing to replace it with {config_cls!r}/{model_cls!r}."
        )
    # Adapter attributes are module-path components that start with the prefix; a prefix that starts with another
    # method's prefix ("lora_" / "lora_x_") would make that method's key filters pick up foreign tensors. A prefix
    # merely containing another ("cocoop_" / "coop_") is harmless: one PeftModel holds adapters of one type, and
    # peft/transformers filter a method's keys by adapter name as well.
    for other_type, other_prefix in PEFT_TYPE_TO_PREFIX_MAPPING.items():
        if other_prefix and (prefix.startswith(other_prefix) or other_prefix.startswith(prefix)):
            raise ValueError(f"Prefix {prefix!r} collides with {other_prefix!r} of PEFT type {other_type}.")
    add_peft_type(name.upper())
    _peft_register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=prefix)


def registered_peft_types() -> tuple[str, ...]:
    """The PEFT types this package has registered with peft (upper case, sorted), read back from peft's mapping."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    return tuple(sorted(str(member.value) for member, model_cls in PEFT_TYPE_TO_TUNER_MAPPING.items()
                        if _is_ours(model_cls)))


def _is_ours(cls: type) -> bool:
    # by module name, not issubclass: a reload of this module re-creates the mixins the tuners' classes derive from
    return cls.__module__.partition(".")[0] == __name__.partition(".")[0]


def _same_class(a: type | None, b: type) -> bool:
    return a is b or (a is not None and (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__))


# -- 3. adapter_config.json reader --------------------------------------------------------------------------------
_WARNED_FILES: set[tuple[str, int, int]] = set()


def guard_config_reader() -> None:
    """Routes ``PeftConfigMixin.from_json_file`` through `validation.read_config_json` and, for this package's
    types, `validation.check_known_fields`: unknown fields raise, unless a newer peft_effadapt wrote the file; those
    are dropped with one warning per file. Idempotent; the result for a valid file is unchanged.

    Relies on peft 0.21 reading every adapter_config.json through that classmethod (``PeftConfig.from_pretrained``,
    ``PeftModel.from_pretrained``/``load_adapter``, transformers' ``load_adapter``) and, after it, dropping unknown
    keys with a warning that advises upgrading peft; the check runs first and names the field instead. peft reads a
    file two or three times per load (``PeftModel.from_pretrained`` once for the type and once for the config,
    ``AutoPeftModel`` once more), hence one warning per file (path, size and modification time).
    """
    from peft.config import PeftConfigMixin

    current = PeftConfigMixin.__dict__["from_json_file"].__func__
    if getattr(current, "_peft_effadapt_guard", False):
        return

    def from_json_file(cls, path_json_file: str, **kwargs):
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

        data = read_config_json(path_json_file)
        config_cls = PEFT_TYPE_TO_CONFIG_MAPPING.get(data.get("peft_type"))
        dropped = []
        if isinstance(config_cls, type) and _is_ours(config_cls):
            dropped = check_known_fields(config_cls, data, path_json_file)
        loaded = current(cls, path_json_file, **kwargs)
        if dropped:
            source = f"Adapter config {path_json_file}"
            _warn_once_per_file(path_json_file, newer_fields_warning(dropped, source, writer_version(data, source)))
            for key in dropped:
                loaded.pop(key, None)
        return loaded

    from_json_file._peft_effadapt_guard = True
    from_json_file.__doc__ = current.__doc__
    PeftConfigMixin.from_json_file = classmethod(from_json_file)


def _warn_once_per_file(path: str, message: str) -> None:
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_mtime_ns, stat.st_size)
    if key not in _WARNED_FILES:
        _WARNED_FILES.add(key)
        warnings.warn(message, UserWarning, stacklevel=3)


# -- 4. configs ---------------------------------------------------------------------------------------------------
@dataclass
class VerifiedAdapterFilesMixin:
    """For PEFT configs (before ``PeftConfig`` in the bases): every config checks its fields against their type
    annotations after peft's ``__post_init__``; ``from_pretrained`` reads the weights file next to the config and
    hands its description to the tuner in `loaded_from`; ``to_dict`` (what ``save_pretrained`` writes) records the
    installed peft_effadapt version as `peft_effadapt_version`.

    Relies on peft 0.21's ``PeftModel.from_pretrained`` and ``PeftModel.load_adapter`` calling the registered config
    class's ``from_pretrained`` and passing the returned object unchanged to the tuner, which injects before it reads
    any weights, and on ``PeftConfigMixin.save_pretrained`` writing ``to_dict()``.
    """

    peft_effadapt_version: str | None = field(
        default=None,
        compare=False,
        metadata={
            "help": "The peft_effadapt version that wrote the adapter_config.json this config was read from (None "
            "for a config built in code). Saving always records the installed version."
        },
    )

    loaded_from = None
    """The `AdapterFile` this config was read with (not a dataclass field: never saved). The tuner checks it against
    the model before injecting, then clears it."""

    def __post_init__(self):
        super().__post_init__()
        check_config_fields(self)

    def to_dict(self) -> dict:
        data = super().to_dict()
        data[VERSION_KEY] = installed_version()  # the writer's version: fields it adds are dropped by older readers
        return data

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        adapter_file = read_adapter_file(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        if adapter_file is not None:
            check_saved_module_keys(config, adapter_file)
            config.loaded_from = adapter_file
        return config


# -- 5. tuners ----------------------------------------------------------------------------------------------------
class ValidatedLoadMixin:
    """For BaseTuner subclasses with `prefix`, `tuner_layer_cls` and `method_name`.

    - ``inject_adapter`` (peft 0.21 calls it from ``BaseTuner.__init__`` and ``PeftModel.add_adapter`` before any
      weights are read): a config read with its file (`VerifiedAdapterFilesMixin`) is checked against the model
      first, so an adapter that does not fit raises before the model is touched.
    - ``_remap_adapter_state_dict_for_load`` (peft 0.21's ``set_peft_model_state_dict`` calls it with the file's
      tensors before loading any): checks the tensors against the adapter's layers (`refusing_damaged_weights`).
    - ``merge_adapter(safe_merge=True)`` and ``_unload_and_optionally_merge`` (peft 0.21 merges layer by layer and
      stops at the first failing one): all-or-nothing, restoring the merged layers' base weights bit for bit.
    """

    method_name: str

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        config = self.peft_config[adapter_name]
        adapter_file = getattr(config, "loaded_from", None)
        if adapter_file is not None:
            config.loaded_from = None  # one use: a config edited and reused later describes no file
            expected = _expected_saved_tensors(type(self), model, config, adapter_name)
            if expected is None:
                check_saved_modules_complete(model, config, adapter_file)
            else:
                check_file_fits_model(expected, adapter_file, self.prefix, self.method_name)
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        if adapter_file is not None:  # injected for this load: removed again if its tensors are refused
            self.peft_config[adapter_name]._injected_for_load = True

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
        with refusing_damaged_weights(model, config, adapter_name):
            check_adapter_tensors(model, adapter_name, state_dict, cls.tuner_layer_cls, cls.prefix, cls.method_name)
            remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
            check_loaded_like_model(model, remapped, cls.method_name)
        return remapped


@contextlib.contextmanager
def refusing_damaged_weights(model: nn.Module, config, adapter_name: str):
    """Around a tuner's checks of the tensors it is about to load (its ``_remap_adapter_state_dict_for_load``).

    On a ValueError, an adapter injected for this very load (a config read with its file: ``PeftModel.from_pretrained``,
    ``load_adapter`` under a new name) is removed again, so the model is as it was before the call. An adapter the
    model held before (``set_peft_model_state_dict``, ``load_adapter`` under that adapter's name, as the Trainer's
    ``resume_from_checkpoint`` does) keeps its values: the checks run before peft loads any tensor.

    Relies on peft 0.21's ``set_peft_model_state_dict`` calling the hook with ``model.peft_config[adapter_name]``, the
    object `ValidatedLoadMixin.inject_adapter` marked, before ``load_state_dict``.
    """
    injected = getattr(config, "_injected_for_load", False)
    try:
        yield
    except ValueError:
        if injected:
            undo_injection(model, adapter_name)
        raise
    config._injected_for_load = False


def _expected_saved_tensors(tuner_cls: type, model: nn.Module, config, adapter_name: str):
    """key -> (shape, floating point) of what saving ``config``'s adapter from ``model`` would write, found by
    injecting it into a copy of the module tree that shares the model's tensors (no weight is copied or changed).
    None when that dry run fails; the real injection then raises its own error or the post-load checks run. The
    random state is restored afterwards, so loading draws the same random numbers as without the check.

    Relies on peft 0.21's ``BaseTuner.__init__`` injecting in place into the module it is given and on
    ``get_peft_model_state_dict`` producing the keys ``save_pretrained`` writes (prefixed ``base_model.model.``
    there, ``model.`` for a bare tuner).
    """
    probe_config = copy.copy(config)
    probe_config.loaded_from = None
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    trainable = [(p, p.requires_grad) for p in model.parameters()]
    try:
        # the probe's random adapter initialisation must not move the user's random stream
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with warnings.catch_warnings(), torch.random.fork_rng(devices=devices):
            warnings.simplefilter("ignore")
            shadow = copy.deepcopy(model, shared)
            probe = tuner_cls(shadow, probe_config, adapter_name)
            with torch.no_grad():
                state = get_peft_model_state_dict(probe, adapter_name=adapter_name)
    except Exception:  # noqa: BLE001 - the dry run is an early check only; the real load reports its own errors
        return None
    finally:
        for param, flag in trainable:  # the probe froze the shared base parameters
            param.requires_grad_(flag)
    return {key.removeprefix("model."): (tuple(value.shape), value.is_floating_point()) for key, value in state.items()}


def _clone_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def undo_injection(model: nn.Module, adapter_name: str) -> None:
    """Removes an adapter whose load failed, so that the user's model is as it was before the call.

    Relies on peft 0.21's ``ModulesToSaveWrapper.set_adapter([])`` making ``unload`` hand back the original module.
    """
    tuner = getattr(model, "base_model", None)
    if not isinstance(tuner, BaseTuner):
        return
    if list(tuner.peft_config) == [adapter_name]:
        for module in tuner.model.modules():
            if isinstance(module, ModulesToSaveWrapper):
                module.set_adapter([])  # unload then hands back the original module, not the copy
        tuner.unload()
        tuner.peft_config.pop(adapter_name, None)
        if "peft_config" in vars(tuner.model):
            del tuner.model.peft_config  # set by BaseTuner.__init__ on the user's model
    else:
        tuner.delete_adapter(adapter_name)
        getattr(model, "peft_config", {}).pop(adapter_name, None)


# -- 6. PeftModel's constructor -----------------------------------------------------------------------------------
_CHECKPOINTING_ALIAS_WARNING = r"`is_gradient_checkpointing` is deprecated"


def quiet_checkpointing_probe() -> None:
    """peft 0.21's ``PeftModel.__init__`` reads ``model.is_gradient_checkpointing``, which transformers >= 5.2x
    deprecated in favour of ``is_activation_checkpointing`` (same value), so every ``get_peft_model`` and
    ``PeftModel.from_pretrained`` (any PEFT type, LoRA too) printed a FutureWarning the user cannot act on. The
    wrapper ignores that one message while peft's constructor runs; anything else warns as before. Idempotent."""
    from peft import PeftModel

    current = PeftModel.__init__
    if getattr(current, "_peft_effadapt_guard", False):
        return

    @functools.wraps(current)
    def __init__(self, *args, **kwargs):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_CHECKPOINTING_ALIAS_WARNING, category=FutureWarning)
            current(self, *args, **kwargs)

    __init__._peft_effadapt_guard = True
    PeftModel.__init__ = __init__


guard_config_reader()
quiet_checkpointing_probe()
