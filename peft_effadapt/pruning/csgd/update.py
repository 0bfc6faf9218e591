"""The centripetal gradient edit of C-SGD (docs/csgd.md, "Update rule"), as pure tensor functions.

For a per-channel tensor P (rows = output channels: a kernel as D x K, a bias or BN gamma/beta as D x 1) with raw
gradient G and cluster labels, the edited gradient is

    G' = A.G + (eta.I + eps.(I - A)).P     row-wise: g'_i = mean_{j in H} g_j + eta.p_i + eps.(p_i - mean_{j in H} p_j)

where A averages rows within each cluster H (singletons: g'_i = g_i + eta.p_i, plain L2-regularised SGD). The
cluster means are computed with `index_add_` in O(D.K) rather than with the dense D x D matrix; the result is the
same. Arithmetic is done in float32 (or float64 for float64 tensors), so bf16 parameters get an exact-as-possible
edit before the cast back.
"""

from __future__ import annotations

import torch


def cluster_means(x: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """A.x for rows of x (dim 0): every row replaced by the mean of its cluster."""
    flat = x.reshape(x.shape[0], -1)
    sums = torch.zeros(counts.shape[0], flat.shape[1], dtype=flat.dtype, device=flat.device)
    sums.index_add_(0, labels, flat)
    return (sums / counts[:, None].to(flat.dtype))[labels].reshape(x.shape)


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def centripetal_gradient(param: torch.Tensor, grad: torch.Tensor, labels: torch.Tensor, strength: float,
                         weight_decay: float = 0.0, grad_scale: float = 1.0) -> torch.Tensor:
    """G' = A.G + grad_scale.(weight_decay.P + strength.(P - A.P)); rows along dim 0, returned in grad's dtype.

    `grad_scale` is the pending loss scale when G is still multiplied by an fp16 loss scaler (1 otherwise), so the
    regularising terms are scaled like the task gradient and come out right after unscaling.
    """
    if param.shape != grad.shape:
        raise ValueError(f"parameter and gradient shapes differ: {tuple(param.shape)} vs {tuple(grad.shape)}")
    if labels.shape != (param.shape[0],):
        raise ValueError(f"need one cluster label per output channel ({param.shape[0]}), got {tuple(labels.shape)}")
    dtype = _work_dtype(grad)
    labels = labels.to(param.device)
    counts = torch.bincount(labels, minlength=int(labels.max()) + 1)
    g, p = grad.to(dtype), param.detach().to(dtype)
    out = cluster_means(g, labels, counts)
    pull = strength * (p - cluster_means(p, labels, counts))
    if weight_decay:
        pull = pull + weight_decay * p
    return (out + grad_scale * pull).to(grad.dtype)


def cluster_deviation(tensor: torch.Tensor, labels: torch.Tensor) -> float:
    """sum over clusters of ||p_i - mean_H p||^2 (the official code's "deviation_sum") for one tensor."""
    labels = labels.to(tensor.device)
    counts = torch.bincount(labels, minlength=int(labels.max()) + 1)
    t = tensor.detach().to(_work_dtype(tensor))
    return float(((t - cluster_means(t, labels, counts)) ** 2).sum())


def max_cluster_gap(tensor: torch.Tensor, labels: torch.Tensor) -> float:
    """Largest |p_i - mean_H p| entry: how far the members of a cluster still are from being identical."""
    labels = labels.to(tensor.device)
    counts = torch.bincount(labels, minlength=int(labels.max()) + 1)
    t = tensor.detach().to(_work_dtype(tensor))
    return float((t - cluster_means(t, labels, counts)).abs().max()) if t.numel() else 0.0
