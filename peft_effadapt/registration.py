"""The only module that touches peft internals.

peft 0.21 keeps its method types in a closed ``str`` enum (``peft.utils.PeftType``) and its public
``register_peft_method`` refuses names that are not members yet. We therefore (1) add real members to that enum,
the way the enum machinery itself creates them, and (2) register config and tuner classes through
``register_peft_method``. Both steps are idempotent: importing ``peft_effadapt`` twice, reloading it, or
registering the same classes again is a no-op; a conflicting registration is a clear error. (3) peft's JSON reader
for adapter configs is wrapped so that a damaged or hostile adapter_config.json is a ValueError naming the file.
(4) ``PeftModel.__init__`` is wrapped to silence one deprecation warning peft 0.21 triggers in transformers 5.2x.
"""

from __future__ import annotations

import json
import os
import sys

from peft.utils import PeftType, register_peft_method

# Every PEFT type this package defines or will define. Reserved at import so that an adapter_config.json naming any
# of them resolves to a member (and to a clear "not registered" error rather than a bare KeyError).
PEFT_TYPE_NAMES: tuple[str, ...] = ("CONSOLIDATOR", "RLP", "QPROMPT", "PYRA", "TEMPME", "COOP", "TOME")


def add_peft_type(name: str) -> PeftType:
    """Adds ``name`` as a member of ``peft.utils.PeftType`` (value == name) and returns it.

    Returns the existing member when it is already there with the same value; raises ``ValueError`` when the name
    exists with another value or the value is taken by another name.
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


def register(name: str, config_cls: type, model_cls: type) -> None:
    """Registers a PEFT method with peft, idempotently.

    ``name`` is the lower-case method name; the prefix is ``name + "_"``, which transformers' adapter loading and
    ``delete_adapter`` rely on, so ``model_cls.prefix`` must equal it.
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
    # peft matches adapter keys by substring of the prefix, so a prefix that contains or is contained in another
    # method's prefix would make loading pick up foreign tensors.
    for other_type, other_prefix in PEFT_TYPE_TO_PREFIX_MAPPING.items():
        if other_prefix and (other_prefix in prefix or prefix in other_prefix):
            raise ValueError(f"Prefix {prefix!r} collides with {other_prefix!r} of PEFT type {other_type}.")
    add_peft_type(name.upper())
    register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=prefix)


def _same_class(a: type | None, b: type) -> bool:
    return a is b or (a is not None and (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__))


MAX_CONFIG_BYTES = 16 * 2**20  # a PEFT adapter_config.json is a few KB; refuse anything absurdly large


def _read_config_json(path_json_file: str) -> dict:
    """peft's ``PeftConfig.from_json_file`` with clear errors: a file that is too large, not UTF-8, not JSON, nested
    too deeply for the parser, or not a JSON object raises ValueError naming the file (peft would raise
    RecursionError, UnicodeDecodeError or a bare TypeError/KeyError for these)."""
    size = os.path.getsize(path_json_file)
    if size > MAX_CONFIG_BYTES:
        raise ValueError(
            f"Adapter config {path_json_file} is {size} bytes; an adapter_config.json is a few KB, refusing files over "
            f"{MAX_CONFIG_BYTES} bytes."
        )
    with open(path_json_file, "rb") as file:
        raw = file.read()
    try:
        data = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise ValueError(f"Adapter config {path_json_file} is nested too deeply to be an adapter config.") from None
    except (UnicodeDecodeError, ValueError) as err:  # JSONDecodeError and int-digit limits are ValueErrors
        raise ValueError(f"Adapter config {path_json_file} is not valid UTF-8 JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"Adapter config {path_json_file} must hold a JSON object, got a {type(data).__name__}.")
    if "peft_type" in data and not isinstance(data["peft_type"], str):
        raise ValueError(f"Adapter config {path_json_file}: peft_type must be a string, got {data['peft_type']!r}.")
    return data


def _guard_config_reader() -> None:
    """Routes ``PeftConfig.from_json_file`` (used by every peft loader, also for peft's own types) through
    `_read_config_json`. The result for a valid file is unchanged. Idempotent."""
    from peft.config import PeftConfigMixin

    current = PeftConfigMixin.__dict__["from_json_file"].__func__
    if getattr(current, "_peft_effadapt_guard", False):
        return

    def from_json_file(cls, path_json_file: str, **kwargs):
        _read_config_json(path_json_file)
        return current(cls, path_json_file, **kwargs)

    from_json_file._peft_effadapt_guard = True
    from_json_file.__doc__ = current.__doc__
    PeftConfigMixin.from_json_file = classmethod(from_json_file)


# The exact message transformers >= 5.2x emits when `is_gradient_checkpointing` (deprecated alias) is read.
_CHECKPOINTING_ALIAS_WARNING = r"`is_gradient_checkpointing` is deprecated"


def _quiet_checkpointing_probe() -> None:
    """peft 0.21's ``PeftModel.__init__`` reads ``model.is_gradient_checkpointing``, which transformers >= 5.2x
    deprecated in favour of ``is_activation_checkpointing`` (same value), so every ``get_peft_model`` and
    ``PeftModel.from_pretrained`` (any PEFT type, LoRA too) printed a FutureWarning the user cannot act on. The
    wrapper ignores that one message while peft's constructor runs; anything else warns as before. Idempotent."""
    import functools
    import warnings

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


for _name in PEFT_TYPE_NAMES:
    add_peft_type(_name)
_guard_config_reader()
_quiet_checkpointing_probe()
