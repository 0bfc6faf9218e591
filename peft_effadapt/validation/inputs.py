"""Checks on forward inputs that read tensor values, written once for eager and compiled forwards."""

from __future__ import annotations

from collections.abc import Callable

import torch


def require(condition: torch.Tensor, message: str, eager_detail: Callable[[], str] | None = None) -> None:
    """Raises `ValueError(message)` when the 0-d bool tensor `condition` is False (eager: `eager_detail()` is appended,
    it may read tensor values). Under torch.compile the check is an in-graph assert instead (a RuntimeError with the
    same message when the graph runs), so a data-dependent input check costs no graph break."""
    if torch.compiler.is_compiling():
        torch._assert_async(condition, message)
    elif not bool(condition):
        raise ValueError(message + (eager_detail() if eager_detail is not None else ""))
