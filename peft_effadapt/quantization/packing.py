"""Index bit packing: a little-endian bitstream (index i occupies bits i*b .. i*b+b-1, bit 0 of a byte is its least
significant bit), so b in {1, 2, 4} packs 8/b indices per byte and any b in 1..8 works."""

from __future__ import annotations

import math

import torch

CODEBOOK_BYTES = 2  # fp16 centroids


def check_bits(bits) -> int:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in 1..8, got {bits!r}.")
    return bits


def packed_length(n: int, bits: int) -> int:
    """Bytes holding n b-bit indices: ceil(b * n / 8)."""
    return math.ceil(check_bits(bits) * n / 8)


def payload_bytes(n: int, bits: int) -> int:
    """Tensor payload of one quantised tensor: packed indices + 2^b fp16 centroids (260 for n=2048, b=1)."""
    return packed_length(n, bits) + CODEBOOK_BYTES * 2**bits


def pack_indices(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 tensor of length ceil(b * N / 8) holding the flattened indices (each < 2^b)."""
    check_bits(bits)
    flat = indices.reshape(-1).to(torch.long).cpu()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(f"indices must lie in 0..{2**bits - 1} for {bits}-bit packing.")
    shifts = torch.arange(bits, dtype=torch.long)
    stream = ((flat[:, None] >> shifts) & 1).reshape(-1)
    pad = (-stream.numel()) % 8
    stream = torch.cat([stream, stream.new_zeros(pad)]).reshape(-1, 8)
    return (stream << torch.arange(8, dtype=torch.long)).sum(dim=1).to(torch.uint8)


def unpack_indices(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_indices`: the first n indices (int64). Raises if the byte count disagrees with (n, bits)."""
    check_bits(bits)
    expected = packed_length(n, bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != expected:
        raise ValueError(
            f"packed indices have shape {tuple(packed.shape)} and dtype {packed.dtype}, but {n} {bits}-bit indices "
            f"need a 1-D uint8 tensor of {expected} bytes."
        )
    stream = ((packed.to(torch.long).cpu()[:, None] >> torch.arange(8, dtype=torch.long)) & 1).reshape(-1)
    stream = stream[: n * bits].reshape(n, bits)
    return (stream << torch.arange(bits, dtype=torch.long)).sum(dim=1)
