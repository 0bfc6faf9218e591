"""On-disk cache for generated datasets (`$PEFT_EFFADAPT_CACHE`, default `~/.cache/peft_effadapt`)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from datasets import Dataset, load_from_disk

from .quiet import no_progress_bars

GENERATOR_VERSION = 3  # bump when rendering or captions change, so stale caches are not reused


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    if override is not None:
        return Path(override)
    env = os.environ.get("PEFT_EFFADAPT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "peft_effadapt"


def cached(name: str, params: dict, build: Callable[[], Dataset], cache: str | os.PathLike | None = None,
           use_cache: bool = True) -> Dataset:
    """Return the dataset stored for (name, params), building and saving it first if absent."""
    if not use_cache:
        return build()
    key = json.dumps({"name": name, "version": GENERATOR_VERSION, **params}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = cache_dir(cache) / f"{name}-{digest}"
    if not path.exists():
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
        with no_progress_bars():
            build().save_to_disk(str(tmp))
        try:
            tmp.rename(path)  # atomic: a concurrent builder may have won the race; its copy is identical
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return load_from_disk(str(path))
