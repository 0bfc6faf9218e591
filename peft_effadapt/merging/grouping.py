"""Concatenating the token sequences of neighbouring frames/clips into one sequence (TempMe's clip grouping).

A batch of S sequences whose groups of `group` consecutive rows belong together (e.g. the frames of one video, kept
contiguous) becomes S / group longer sequences laid out as ``[protected tokens of item 1 .. item g, remaining tokens
of item 1, .., item g]``: every class token stays in front, where `bipartite_soft_matching` protects them.
"""

from __future__ import annotations

from functools import lru_cache

import torch


def _grouping_order(group: int, num_tokens: int, protected: int, device) -> torch.Tensor:
    """Token order of a grouped sequence as indices into the g·N tokens of the g items laid end to end."""
    starts = torch.arange(group, device=device)[:, None] * num_tokens
    head = (starts + torch.arange(protected, device=device)).flatten()
    tail = (starts + torch.arange(protected, num_tokens, device=device)).flatten()
    return torch.cat([head, tail])


_cached_grouping_order = lru_cache(maxsize=64)(_grouping_order)


def grouping_order(group: int, num_tokens: int, protected: int, device) -> torch.Tensor:
    """`_grouping_order`, built once per shape and device in eager mode (no op per forward); under torch.compile it is
    built in the graph, where it is a constant."""
    if torch.compiler.is_compiling():
        return _grouping_order(group, num_tokens, protected, device)
    return _cached_grouping_order(group, num_tokens, protected, torch.device(device))


def group_sequences(x: torch.Tensor, group: int, protected: int = 1) -> torch.Tensor:
    """(S, N, C) -> (S / group, group · N, C); the `protected` leading tokens of every item are gathered in front.

    Works for hidden states, matching metrics and sizes (C = 1) alike, so sizes stay aligned with their tokens; one
    `index_select` with a constant order per call.
    """
    if group < 1:
        raise ValueError(f"group size must be >= 1, got {group}.")
    sequences, num_tokens, channels = x.shape
    if sequences % group:
        raise ValueError(
            f"cannot group {sequences} sequences into clips of {group}: the sequence count must be divisible by the "
            "group size (frames of one video must be contiguous and their count divisible by every group size)."
        )
    if not 0 <= protected <= num_tokens:
        raise ValueError(f"protected={protected} is outside 0..{num_tokens} (tokens per sequence).")
    x = x.reshape(sequences // group, group * num_tokens, channels)
    return x.index_select(1, grouping_order(group, num_tokens, protected, x.device))


def ungroup_protected(x: torch.Tensor, protected: int) -> torch.Tensor:
    """(S, N, C) -> (S · protected, C): the `protected` leading tokens of every sequence, one row each, in order.
    After TempMe's last grouping these are the class tokens of the original frames, in frame order."""
    return x[:, :protected].reshape(-1, x.shape[-1])
