"""ResRep compactors: identity-initialised 1x1 "forgetting" layers after a producer's BatchNorm, and their fold.

A compactor is a child `resrep_compactor` of the module whose output it transforms (the group's BatchNorm, or the
producer itself when there is none, e.g. a ViT/CLIP `fc1`), applied by a forward hook (`ApplyCompactor`), so the
stock state-dict keys of the model are unchanged and only `...resrep_compactor.weight` / `.mask` are added. Compactor weights are D x D
matrices for both convs (a 1x1 conv over the channel dim) and linears.

Residual streams (beyond the paper, which prunes internal layers): one compactor is shared by every producer of the
stream (the stage projection or stem and the last conv of each block). It is registered under the first producer's
host and applied by a hook after every producer's BatchNorm, so the whole stream lives in the compactor's basis:
a zero row zeroes that channel in every addend of the residual sum, and each producer folds the same Q exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from ..groups import ChannelGroup

ATTRIBUTE = "resrep_compactor"
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class ResRepCompactor(nn.Module):
    """Q (D x D, identity at insertion) applied over the channel dimension (`channel_dim` 1 for NC..., -1 for
    ...C), with a `mask` buffer (1 = remember, 0 = forget) that travels with the weights in checkpoints."""

    def __init__(self, size: int, channel_dim: int, device=None, dtype=None):
        super().__init__()
        self.channel_dim = channel_dim
        self.weight = nn.Parameter(torch.eye(size, device=device, dtype=dtype))
        self.register_buffer("mask", torch.ones(size, device=device, dtype=dtype))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(hidden.dtype)
        if self.channel_dim == -1 or hidden.dim() == 2:
            return hidden @ weight.T
        return (hidden.movedim(1, -1) @ weight.T).movedim(-1, 1).contiguous()

    def row_norms(self) -> torch.Tensor:
        return self.weight.detach().float().norm(dim=1)

    def extra_repr(self) -> str:
        return f"size={self.weight.shape[0]}, masked={int((self.mask == 0).sum())}"


def host_paths(group: ChannelGroup) -> list[str]:
    """Modules whose outputs the compactor transforms, one per producer: its BatchNorm, else the producer."""
    if group.norms:
        return list(group.norms)
    return [path for path, _ in group.producers]


class ApplyCompactor:
    """Forward hook of a host: its output through the compactor. A callable bound to the compactor module (owned by
    the first host), so a deep copy of the model applies the copy's compactor at every host."""

    def __init__(self, compactor: ResRepCompactor) -> None:
        self.compactor = compactor

    def __call__(self, module: nn.Module, args, output):
        return self.compactor(output)


def check_group(model: nn.Module, group: ChannelGroup) -> None:
    """Raises `ValueError` unless ResRep can put one compactor on `group`: conv/linear producers, each followed by
    its own BatchNorm (one per producer, tracking running statistics) or by none."""
    kinds = [kind for _, kind in group.producers]
    if "depthwise" in kinds or (group.norms and len(group.norms) != len(group.producers)):
        raise ValueError(f"ResRep needs conv/linear producers, each optionally followed by its own BatchNorm; group "
                         f"{group.name!r} has producers {group.producers} and norms {group.norms} (a depthwise conv "
                         "cannot absorb the compactor: select other groups, e.g. by glob, or use C-SGD).")
    for path in host_paths(group):
        host = model.get_submodule(path)
        if isinstance(host, _NORMS) and not host.track_running_stats:
            raise ValueError(f"{path!r} uses batch statistics in eval mode (track_running_stats=False); it cannot be "
                             "folded into the conv.")


def insert_compactor(model: nn.Module, group: ChannelGroup) -> ResRepCompactor:
    check_group(model, group)
    hosts = [model.get_submodule(p) for p in host_paths(group)]
    producer = model.get_submodule(group.producers[0][0])
    channel_dim = -1 if isinstance(producer, nn.Linear) else 1
    compactor = ResRepCompactor(group.size, channel_dim, device=producer.weight.device, dtype=producer.weight.dtype)
    hosts[0].add_module(ATTRIBUTE, compactor)
    for host in hosts:
        host.register_forward_hook(ApplyCompactor(compactor))
    return compactor


def find_compactor(model: nn.Module, group: ChannelGroup) -> ResRepCompactor | None:
    return getattr(model.get_submodule(host_paths(group)[0]), ATTRIBUTE, None)


def remove_compactor(model: nn.Module, group: ChannelGroup) -> None:
    for i, path in enumerate(host_paths(group)):
        host = model.get_submodule(path)
        for key, hook in list(host._forward_hooks.items()):
            if isinstance(hook, ApplyCompactor):
                del host._forward_hooks[key]
        if i == 0 and hasattr(host, ATTRIBUTE):
            delattr(host, ATTRIBUTE)


@torch.no_grad()
def fold_compactor(model: nn.Module, group: ChannelGroup) -> None:
    """Merges every producer (+ its BatchNorm, eval statistics, its own eps) and the compactor into the producer,
    exactly:
    K' = Q·K·s, b' = Q·((b - mu)·s + beta) with s = gamma/sqrt(var + eps). With a BatchNorm the bias goes into an
    "affine" BatchNorm (mu = 0, var = 1, gamma = sqrt(1 + eps), beta = b'; exact in eval), so stock HF classes stay.
    The compactor is removed afterwards."""
    compactor = find_compactor(model, group)
    if compactor is None:
        raise ValueError(f"Group {group.name!r} has no ResRep compactor to fold.")
    q = compactor.weight.detach().double()
    norms = list(group.norms) or [None] * len(group.producers)
    for (path, _), norm_path in zip(group.producers, norms):
        _fold_one(model.get_submodule(path), model.get_submodule(norm_path) if norm_path else None, q)
    remove_compactor(model, group)


def _fold_one(producer: nn.Module, norm: nn.Module | None, q: torch.Tensor) -> None:
    kernel = producer.weight.detach().double()
    shape = kernel.shape
    kernel = kernel.reshape(shape[0], -1)
    bias = producer.bias.detach().double() if producer.bias is not None else torch.zeros(shape[0], dtype=q.dtype,
                                                                                      device=q.device)
    if norm is not None:
        gamma = norm.weight.detach().double() if norm.weight is not None else torch.ones_like(bias)
        beta = norm.bias.detach().double() if norm.bias is not None else torch.zeros_like(bias)
        scale = gamma / torch.sqrt(norm.running_var.double() + norm.eps)
        kernel = kernel * scale[:, None]
        bias = (bias - norm.running_mean.double()) * scale + beta
    kernel, bias = q @ kernel, q @ bias
    producer.weight.copy_(kernel.reshape(shape).to(producer.weight.dtype))
    if norm is None:
        if producer.bias is not None:
            producer.bias.copy_(bias.to(producer.bias.dtype))
        elif bias.abs().max() > 0:  # only possible with a producer bias; keep the function exact anyway
            producer.bias = nn.Parameter(bias.to(producer.weight.dtype))
    else:
        if producer.bias is not None:
            producer.bias.zero_()
        dtype = norm.running_mean.dtype
        if norm.weight is not None:
            norm.running_mean.zero_()
            norm.running_var.fill_(1.0)
            norm.weight.fill_((1.0 + norm.eps) ** 0.5)
            norm.bias.copy_(bias.to(norm.bias.dtype))
        else:  # non-affine BatchNorm: x -> (x + b') / sqrt((1 - eps) + eps)
            norm.running_mean.copy_((-bias).to(dtype))
            norm.running_var.fill_(1.0 - norm.eps)
