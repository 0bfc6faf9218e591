"""Progress bars off for the testbed's own bookkeeping (checkpoint loading, dataset splits and caching)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from datasets import utils as datasets_tqdm
from transformers.utils import logging as transformers_logging


@contextmanager
def no_progress_bars() -> Iterator[None]:
    """Silences datasets' and transformers' progress bars inside the block, restoring the caller's setting after."""
    datasets_was_off = datasets_tqdm.are_progress_bars_disabled()
    transformers_was_on = transformers_logging.is_progress_bar_enabled()
    datasets_tqdm.disable_progress_bars()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not datasets_was_off:
            datasets_tqdm.enable_progress_bars()
        if transformers_was_on:
            transformers_logging.enable_progress_bar()
