"""Cluster formation for C-SGD: partitions of a layer's output channels into the clusters that training makes
identical (docs/csgd.md, "Clusters").

A clustering is a list of sorted index lists, sorted by their smallest member, that partitions `range(n)`.
Methods: `"kmeans"` (the official default: k-means on the flattened kernel rows), `"even"` (contiguous near-equal
groups by index) and `"biased"` (one cluster of n-k+1 channels plus k-1 singletons), both from the CVPR-era code.

Deviation: the official code calls scikit-learn's `KMeans` with its defaults and no seed; scikit-learn is not a
dependency of this library, so k-means here is our own torch implementation (k-means++ seeding, Lloyd iterations,
`n_init` restarts keeping the lowest inertia, empty clusters re-seeded with the farthest point) with a fixed seed,
which makes the clusters reproducible and identical on every rank.
"""

from __future__ import annotations

import torch

CLUSTER_METHODS = ("kmeans", "even", "biased")


def _check_counts(n: int, k: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"the number of clusters must be a positive int, got {k!r}")
    if k > n:
        raise ValueError(f"cannot form {k} clusters from {n} channels: the cluster count must be <= the channel count")


def canonical(clusters: list[list[int]], n: int) -> list[list[int]]:
    """Sort members and clusters (by smallest member) and check that `clusters` partitions `range(n)`."""
    out = sorted((sorted(int(i) for i in c) for c in clusters), key=lambda c: c[0] if c else -1)
    flat = [i for c in out for i in c]
    if any(not c for c in out) or sorted(flat) != list(range(n)):
        raise ValueError(f"clusters must partition the {n} channels into non-empty groups, got {clusters}")
    return out


def even_clusters(n: int, k: int) -> list[list[int]]:
    """Contiguous groups of near-equal size: the first n % k groups get one more channel."""
    _check_counts(n, k)
    base, extra = divmod(n, k)
    out, start = [], 0
    for i in range(k):
        size = base + (1 if i < extra else 0)
        out.append(list(range(start, start + size)))
        start += size
    return out


def biased_clusters(n: int, k: int) -> list[list[int]]:
    """One cluster of the first n-k+1 channels, every other channel a singleton."""
    _check_counts(n, k)
    return [list(range(n - k + 1))] + [[i] for i in range(n - k + 1, n)]


def _kmeans_once(x: torch.Tensor, k: int, gen: torch.Generator, max_iter: int, tol: float):
    n = x.shape[0]
    # k-means++ seeding
    centers = [x[torch.randint(n, (1,), generator=gen).item()]]
    d2 = ((x - centers[0]) ** 2).sum(1)
    for _ in range(1, k):
        total = d2.sum()
        if total <= 0:  # all remaining points coincide with a center: pick any unused point
            idx = torch.randint(n, (1,), generator=gen).item()
        else:
            idx = torch.multinomial(d2 / total, 1, generator=gen).item()
        centers.append(x[idx])
        d2 = torch.minimum(d2, ((x - x[idx]) ** 2).sum(1))
    c = torch.stack(centers)
    labels = torch.zeros(n, dtype=torch.long)
    for _ in range(max_iter):
        dist = torch.cdist(x, c) ** 2
        labels = dist.argmin(1)
        counts = torch.bincount(labels, minlength=k)
        for empty in (counts == 0).nonzero().flatten().tolist():  # re-seed with the farthest point
            far = dist.gather(1, labels[:, None]).squeeze(1)
            far[counts[labels] <= 1] = -1  # never steal a cluster's last member
            j = int(far.argmax())
            counts[labels[j]] -= 1
            labels[j] = empty
            counts[empty] = 1
        new = torch.zeros_like(c).index_add_(0, labels, x) / counts[:, None].to(x.dtype)
        shift = ((new - c) ** 2).sum()
        c = new
        if shift <= tol:
            break
    inertia = ((x - c[labels]) ** 2).sum().item()
    return labels, inertia


def kmeans_clusters(rows: torch.Tensor, k: int, seed: int = 0, n_init: int = 10, max_iter: int = 300,
                    tol: float = 1e-4) -> list[list[int]]:
    """k-means on the rows of a (n, features) matrix (e.g. conv kernels reshaped to D x C*kh*kw) into k clusters.

    `tol` is relative to the mean feature variance, as in scikit-learn. Always returns exactly k non-empty clusters.
    """
    x = rows.detach().reshape(rows.shape[0], -1).to("cpu", torch.float64)
    n = x.shape[0]
    _check_counts(n, k)
    if k == n:
        return [[i] for i in range(n)]
    if k == 1:
        return [list(range(n))]
    gen = torch.Generator().manual_seed(int(seed))
    abs_tol = tol * x.var(0).mean().item() if n > 1 else 0.0
    best, best_inertia = None, float("inf")
    for _ in range(max(1, int(n_init))):
        labels, inertia = _kmeans_once(x, k, gen, max_iter, abs_tol)
        if inertia < best_inertia:
            best, best_inertia = labels, inertia
    return labels_to_clusters(best, k)


def labels_to_clusters(labels, k: int | None = None) -> list[list[int]]:
    labels = torch.as_tensor(labels).tolist()
    k = k if k is not None else max(labels) + 1
    out = [[] for _ in range(k)]
    for i, lab in enumerate(labels):
        out[lab].append(i)
    return canonical(out, len(labels))


def clusters_to_labels(clusters: list[list[int]], n: int) -> torch.Tensor:
    """Label vector (channel -> cluster index) of a canonical clustering."""
    labels = torch.empty(n, dtype=torch.long)
    for c, members in enumerate(clusters):
        labels[members] = c
    return labels


def form_clusters(weight: torch.Tensor, k: int, method: str = "kmeans", seed: int = 0,
                  n_init: int = 10) -> list[list[int]]:
    """Clusters of a layer's output channels: rows of `weight` (dim 0 = output channels) for k-means."""
    if method not in CLUSTER_METHODS:
        raise ValueError(f"cluster_method must be one of {CLUSTER_METHODS}, got {method!r}")
    n = weight.shape[0]
    if method == "even":
        return even_clusters(n, k)
    if method == "biased":
        return biased_clusters(n, k)
    return kmeans_clusters(weight, k, seed=seed, n_init=n_init)


def averaging_matrix(clusters: list[list[int]], n: int) -> torch.Tensor:
    """The D x D matrix A of the spec: A_ij = 1/|H| when i and j share cluster H (singletons: unit rows)."""
    a = torch.zeros(n, n)
    for members in canonical(clusters, n):
        idx = torch.tensor(members)
        a[idx[:, None], idx[None, :]] = 1.0 / len(members)
    return a
