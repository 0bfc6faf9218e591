"""Which peft_effadapt version wrote a saved file, and what a load does with the fields this version does not know.

Every file this package writes (adapter_config.json, slimming_plan.json) records the writing version under
`VERSION_KEY`. On load, `fields_to_drop` decides per file: unknown fields that a newer release wrote are dropped (the
caller warns once with `newer_fields_warning`); unknown fields from the same or an older release, or from a file
that records no version (written before versions were recorded), are a damaged file or a typo and raise, naming the
closest known field.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping

from packaging.version import InvalidVersion, Version

VERSION_KEY = "peft_effadapt_version"


def installed_version() -> str:
    from .._version import __version__

    return __version__


def writer_version(data: Mapping, source: str, keys: tuple[str, ...] = (VERSION_KEY,)) -> Version | None:
    """The version recorded in ``data`` under the first of ``keys`` present (None when none is). Raises ValueError
    naming the file when the recorded value is not a version string."""
    key = next((key for key in keys if data.get(key) is not None), None)
    if key is None:
        return None
    value = data[key]
    if isinstance(value, str):
        try:
            return Version(value)
        except InvalidVersion:
            pass
    shown = repr(value[:80]) if isinstance(value, str) else f"a {type(value).__name__}"
    raise ValueError(f"{source}: {key} must be a version string such as '0.1.0', got {shown}.")


def fields_to_drop(keys: Iterable[str], known: Iterable[str], source: str, owner: str,
                   writer: Version | None) -> list[str]:
    """The ``keys`` outside ``known`` when ``writer`` (the version that wrote them, see `writer_version`) is newer
    than the installed peft_effadapt: sorted, for the caller to drop and to name in `newer_fields_warning`. An empty
    list when every key is known.

    Raises:
        ValueError: unknown keys written by this or an older version, or by a file that records no version: names
            each key and the closest known one (``owner`` names what does not know them, e.g. ``RLPConfig``).
    """
    known = set(known)
    unknown = sorted(str(key) for key in keys if key not in known)
    if not unknown:
        return []
    installed = installed_version()
    if writer is not None and writer > Version(installed):
        return unknown
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
        hints.append(f"{key!r} (did you mean {close[0]!r}?)" if close else f"{key!r} (no similar field)")
    provenance = (f"It was written by peft_effadapt {writer} and {installed} is installed, so they are no newer "
                  "release's fields" if writer is not None
                  else f"It records no {VERSION_KEY} (written before versions were recorded, or edited by hand)")
    raise ValueError(
        f"{source} has fields that {owner} does not know: {', '.join(hints)}. {provenance}: fix or remove them; an "
        "unknown field would otherwise be ignored and the model built differently than saved."
    )


def newer_fields_warning(fields: list[str], source: str, writer: Version) -> str:
    """The one warning of a load that dropped ``fields`` written by the newer version ``writer``."""
    return (
        f"{source} was written by peft_effadapt {writer}, newer than the installed {installed_version()}. This "
        f"version does not know its fields {', '.join(repr(f) for f in fields)} and dropped them, so it loads as this "
        "version understands it; upgrade peft_effadapt (pip install -U peft-effadapt) to use them."
    )
