"""Connectivity of Consolidator's grouped branches: pure tensor functions, no module code.

A branch with ``g`` groups on a Linear ``Din -> Dout`` is a block-diagonal matrix (a grouped 1x1 convolution):
output row ``o`` of group ``k = o // so`` reads the ``si = Din / g`` input channels of slice ``k`` of the (optionally
channel-shuffled) input. Every row therefore reads exactly ``si`` channels, which we describe by a column table
``cols[o] = perm[k * si : (k + 1) * si]`` (spec §b.2-b.3). For q/k/v projections in ``qkv_grouping="fused"`` mode the
rows are a slice of a virtual fused ``Din -> 3 * Dout`` layer (spec §b.10), which the ``row_offset``/``virtual_rows``
arguments express.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def shuffle_permutation(channels: int, groups: int) -> torch.Tensor:
    """ShuffleNet channel reorder: position ``j`` of the shuffled vector holds channel ``(j % g) * (C / g) + j // g``.

    Equivalent to viewing the channels as a ``g x (C/g)`` grid, transposing and flattening (e.g. C=8, g=4 gives
    ``[0, 2, 4, 6, 1, 3, 5, 7]``).
    """
    if channels % groups:
        raise ValueError(f"channel shuffle needs groups ({groups}) to divide the channel count ({channels}).")
    j = torch.arange(channels)
    return (j % groups) * (channels // groups) + j // groups


@dataclass(frozen=True)
class BranchPattern:
    """Where one grouped branch connects inside one real Linear layer."""

    in_features: int
    out_features: int
    groups: int
    shuffle: bool
    row_offset: int = 0  # first row of this layer inside the virtual (e.g. fused qkv) layer
    virtual_rows: int | None = None  # rows of the virtual layer; None = out_features

    def __post_init__(self):
        rows = self.virtual_rows or self.out_features
        if self.groups < 1 or self.in_features % self.groups or rows % self.groups:
            raise ValueError(
                f"group count {self.groups} must divide in_features={self.in_features} and "
                f"out_features={rows}{' (fused q|k|v rows)' if self.virtual_rows else ''}."
            )

    @property
    def in_per_group(self) -> int:
        return self.in_features // self.groups

    @property
    def out_per_group(self) -> int:
        return (self.virtual_rows or self.out_features) // self.groups

    def input_order(self) -> torch.Tensor:
        if self.shuffle:
            return shuffle_permutation(self.in_features, self.groups)
        return torch.arange(self.in_features)

    def row_groups(self) -> torch.Tensor:
        """Group index of every real output row."""
        return (self.row_offset + torch.arange(self.out_features)) // self.out_per_group

    def columns(self) -> torch.Tensor:
        """``[Dout, si]`` table of the input channels each output row reads."""
        si = self.in_per_group
        starts = self.row_groups()[:, None] * si
        return self.input_order()[starts + torch.arange(si)]

    def is_block_aligned(self) -> bool:
        """True when the real rows are whole groups, so the branch runs as a grouped matmul without a dense matrix."""
        so = self.out_per_group
        return self.row_offset % so == 0 and self.out_features % so == 0

    def grouped_input_index(self) -> torch.Tensor | slice | None:
        """Input channels, in group order, read by the real rows (block-aligned case): None when that is every
        channel in natural order, a slice when it is a contiguous range (a view, no copy), else an index tensor."""
        first = self.row_offset // self.out_per_group
        count = self.out_features // self.out_per_group
        start, stop = first * self.in_per_group, (first + count) * self.in_per_group
        index = self.input_order()[start:stop]
        if torch.equal(index, torch.arange(start, stop)):
            return None if (start, stop) == (0, self.in_features) else slice(start, stop)
        return index

    def dense(self, values: torch.Tensor, columns: torch.Tensor | None = None) -> torch.Tensor:
        """Scatter branch values ``[Dout, si]`` into the dense ``[Dout, Din]`` matrix (`columns`: a cached
        `columns()` on the values' device)."""
        out = values.new_zeros(self.out_features, self.in_features)
        return out.scatter(1, (self.columns() if columns is None else columns).to(values.device), values)

    def mask(self) -> torch.Tensor:
        out = torch.zeros(self.out_features, self.in_features, dtype=torch.bool)
        return out.scatter(1, self.columns(), True)


def support_index(patterns: list[BranchPattern]) -> torch.Tensor:
    """Flat row-major indices of the union of the branches' supports: the positions whose values are stored."""
    if not patterns:
        raise ValueError("a Consolidator layer needs at least one branch.")
    mask = patterns[0].mask()
    for pattern in patterns[1:]:
        mask |= pattern.mask()
    return mask.flatten().nonzero().squeeze(1)
