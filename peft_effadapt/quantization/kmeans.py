"""1-D K-means (Lloyd) for scalar codebooks, and nearest-centroid assignment."""

from __future__ import annotations

import torch


def assign_nearest(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid for every entry (centroids sorted ascending; ties go to the lower index, as
    `argmin` would). Runs as a binary search over the midpoints, so it costs O(N log K)."""
    flat = values.reshape(-1)
    if centroids.numel() == 1:
        return torch.zeros_like(flat, dtype=torch.long).reshape(values.shape)
    mids = (centroids[1:] + centroids[:-1]) / 2
    return torch.searchsorted(mids.to(flat.dtype).contiguous(), flat.contiguous(), right=False).reshape(values.shape)


def quantile_init(values: torch.Tensor, k: int) -> torch.Tensor:
    """Centroids at the (j + 0.5) / k quantiles of the values (spec b.5 [design])."""
    flat = values.reshape(-1).double()
    q = (torch.arange(k, dtype=torch.float64, device=flat.device) + 0.5) / k
    return torch.quantile(flat, q).to(values.dtype)


def kmeans_1d(values: torch.Tensor, k: int, init: torch.Tensor | None = None, max_iter: int = 100,
              tol: float = 1e-6) -> torch.Tensor:
    """Sorted codebook of `k` centroids fitted to the entries of `values` by Lloyd iterations.

    Starts from `init` (warm start: the previous codebook) or the quantiles; stops when no centroid moves by more than
    `tol` or after `max_iter` iterations. An empty cluster is re-seeded at the entry with the largest quantisation
    error. Computed in float64 and returned in the dtype of `values`.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    flat = values.detach().reshape(-1).double()
    if flat.numel() == 0:
        raise ValueError("cannot fit a codebook to an empty tensor.")
    centroids = (quantile_init(flat, k) if init is None else init.detach().double().reshape(-1).clone())
    if centroids.numel() != k:
        raise ValueError(f"init has {centroids.numel()} centroids, expected {k}.")
    centroids, _ = torch.sort(centroids)
    for _ in range(max_iter):
        idx = assign_nearest(flat, centroids)
        sums = torch.zeros(k, dtype=flat.dtype, device=flat.device).index_add_(0, idx, flat)
        counts = torch.bincount(idx, minlength=k).to(flat.dtype)
        new = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
        for j in torch.nonzero(counts == 0).reshape(-1).tolist():  # re-seed empty clusters
            err = (flat - new[assign_nearest(flat, new)]).abs()
            worst = int(err.argmax())
            if float(err[worst]) == 0.0:
                break  # every entry is already exact: fewer distinct values than centroids
            new[j] = flat[worst]
            new, _ = torch.sort(new)
        new, _ = torch.sort(new)
        shift = float((new - centroids).abs().max())
        centroids = new
        if shift < tol:
            break
    return centroids.to(values.dtype)
