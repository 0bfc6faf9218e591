"""Checks of an adapter config: its JSON file, its field names, and the values of its fields."""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import types
import typing

from .versions import fields_to_drop, writer_version

MAX_CONFIG_BYTES = 16 * 2**20  # a PEFT adapter_config.json is a few KB; refuse anything absurdly large
_INT64 = 2**63
# Keys peft itself writes to or reads from adapter_config.json besides the dataclass fields: `runtime_config` is
# dropped by peft's reader with its own warning.
_PEFT_EXTRA_KEYS = frozenset({"runtime_config"})


def read_config_json(path_json_file: str) -> dict:
    """Returns the JSON object in an adapter_config.json. A file that is too large, not UTF-8, not JSON, nested too
    deeply for the parser, or not a JSON object raises ValueError naming the file (peft would raise RecursionError,
    UnicodeDecodeError or a bare TypeError/KeyError for these)."""
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


def check_known_fields(config_cls: type, data: dict, source: str) -> list[str]:
    """Every key of a saved config must be a field of ``config_cls``, unless a newer peft_effadapt wrote the file.

    Returns:
        The unknown keys of a file a newer version wrote (see `versions.fields_to_drop`): the caller drops them.

    Raises:
        ValueError: unknown keys of a file this or an older version wrote (a typo such as ``rep_dropp``), naming each
            and the closest known field, instead of dropping them silently.
    """
    known = {field.name for field in dataclasses.fields(config_cls)} | _PEFT_EXTRA_KEYS
    source = f"Adapter config {source}"
    return fields_to_drop(data, known, source, config_cls.__name__, writer_version(data, source))


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
