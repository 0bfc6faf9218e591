"""Bipartite soft matching and size-weighted token merging (Bolya et al., "Token Merging: Your ViT but Faster").

Pure tensor functions: they know nothing about the network. A block computes a *metric* per token (the attention keys
averaged over heads), asks `bipartite_soft_matching` for a `MergePlan`, and applies the plan to any per-token tensor
with `merge_tokens` / `merge_wavg` / `merge_source`.

Token layout conventions (shared by every function here):

* tokens at even positions form set A (the possible *sources*), odd positions set B (the *destinations*);
* the first `protected` tokens (0: none, 1: CLS, 2: CLS + DeiT distillation token; TempMe: one CLS per frame of a
  clip, any count) are never merged: a protected A token is never a source, nothing merges into a protected B token;
* after a merge the order is ``[protected... (original order), unmerged A (original order), B (original order)]``,
  so CLS stays at index 0 and a distillation token at index 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Modulation = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``f(sources, destinations) -> sources'`` applied to the r size-weighted source tokens (B×r×C, rows in descending
match-score order) and their destinations gathered before any merge (B×r×C). PYRA's re-activation is one."""

MAX_PROTECTED = 2


@dataclass(frozen=True)
class MergePlan:
    """What one bipartite matching decided for a batch of sequences of `num_tokens` tokens.

    `unmerged_idx` (B×(|A|−r)×1, ascending) indexes the A tokens that stay; `src_idx` (B×r×1) the A tokens merged
    away, ordered by descending similarity score (row k = k-th most similar pair); `dst_idx` (B×r×1) the B token each
    source merges into. Several sources may share a destination.
    """

    num_tokens: int
    r: int
    protected: int
    unmerged_idx: torch.Tensor | None
    src_idx: torch.Tensor | None
    dst_idx: torch.Tensor | None

    @property
    def num_tokens_after(self) -> int:
        return self.num_tokens - self.r


def max_mergeable(num_tokens: int, protected: int = 1) -> int:
    """The most tokens one bipartite step can remove from `num_tokens` tokens: ``(N − protected) // 2``."""
    return max((num_tokens - protected) // 2, 0)


def _check_protected(protected: int) -> None:
    """Any count of leading tokens may be protected (configs of single-image methods allow up to MAX_PROTECTED)."""
    if not isinstance(protected, int) or isinstance(protected, bool) or protected < 0:
        raise ValueError(
            f"protected must be an int >= 0 (0: no class token, 1: CLS, 2: CLS + distillation token, more: several "
            f"class tokens in front, e.g. one per frame), got {protected!r}."
        )


def bipartite_soft_matching(metric: torch.Tensor, r: int, protected: int = 1) -> MergePlan:
    """Plans the merge of the `r` most similar (A, B) token pairs of every sequence.

    `metric` is B×N×C (e.g. keys averaged over heads); similarity is the cosine of the L2-normalised rows. `r` is
    clamped to ``max_mergeable(N, protected)`` as in the reference ToMe. The plan is computed without gradient: the
    matching indices are not differentiated, the merge that uses them is.
    """
    _check_protected(protected)
    num_tokens = metric.shape[1]
    r = min(int(r), max_mergeable(num_tokens, protected))
    if r <= 0:
        return MergePlan(num_tokens, 0, protected, None, None, None)
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        if protected >= 1:
            scores[..., : (protected + 1) // 2, :] = -torch.inf  # protected tokens in A (CLS at 0) are never sources
        if protected >= 2:
            scores[..., :, : protected // 2] = -torch.inf  # protected tokens in B (e.g. distillation) receive nothing
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unmerged_idx = edge_idx[..., r:, :].sort(dim=1).values  # keep the original order (CLS first)
        src_idx = edge_idx[..., :r, :]
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
    return MergePlan(num_tokens, r, protected, unmerged_idx, src_idx, dst_idx)


def merge_tokens(
    plan: MergePlan, x: torch.Tensor, mode: str = "mean", modulate: Modulation | None = None
) -> torch.Tensor:
    """Applies `plan` to a B×N×C tensor: sources are reduced (``"sum"``, ``"mean"``, ``"amax"``) into their
    destinations. `modulate`, if given, rewrites the source rows before the reduction (see `Modulation`)."""
    if plan.r == 0:
        return x
    if x.shape[1] != plan.num_tokens:
        raise ValueError(f"the merge plan is for {plan.num_tokens} tokens, got a tensor with {x.shape[1]}.")
    channels = x.shape[-1]
    a, b = x[..., ::2, :], x[..., 1::2, :]
    batch, n_a = a.shape[:2]
    unmerged = a.gather(dim=-2, index=plan.unmerged_idx.expand(batch, n_a - plan.r, channels))
    src = a.gather(dim=-2, index=plan.src_idx.expand(batch, plan.r, channels))
    dst_index = plan.dst_idx.expand(batch, plan.r, channels)
    if modulate is not None:
        src = modulate(src, b.gather(dim=-2, index=dst_index))
    b = b.scatter_reduce(-2, dst_index, src, reduce=mode)
    if plan.protected >= 2:  # protected B tokens (e.g. the distillation token) go back between the protected A ones
        return torch.cat([_interleave_protected(unmerged, b, plan.protected), unmerged[:, (plan.protected + 1) // 2:],
                          b[:, plan.protected // 2:]], dim=1)
    return torch.cat([unmerged, b], dim=1)


def _interleave_protected(a: torch.Tensor, b: torch.Tensor, protected: int) -> torch.Tensor:
    """The `protected` leading tokens in their original order: even positions from A's head, odd from B's."""
    n_a, n_b = (protected + 1) // 2, protected // 2
    pairs = torch.stack([a[:, :n_b], b[:, :n_b]], dim=2).flatten(1, 2)
    return torch.cat([pairs, a[:, n_b:n_a]], dim=1)


def merge_wavg(
    plan: MergePlan, x: torch.Tensor, size: torch.Tensor | None = None, modulate: Modulation | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted merge: each destination becomes ``(s_b x_b + Σ s_i x_i) / (s_b + Σ s_i)`` and its size the sum.

    `size` is B×N×1 (None: every token has size 1). `modulate` acts on the size-weighted sources ``s_i x_i``; sizes
    are merged unmodulated. Returns ``(x, size)`` for the shorter sequence.
    """
    if size is None:
        size = torch.ones_like(x[..., :1])
    if plan.r == 0:
        return x, size
    weighted = merge_tokens(plan, x * size, mode="sum", modulate=modulate)
    size = merge_tokens(plan, size, mode="sum")
    return weighted / size, size


def init_source(batch: int, num_tokens: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The identity source map (B×N×N): token i is made of original patch i."""
    return torch.eye(num_tokens, device=device, dtype=dtype)[None].expand(batch, num_tokens, num_tokens)


def merge_source(plan: MergePlan, source: torch.Tensor | None, batch: int, device=None) -> torch.Tensor:
    """Updates a 0/1 source map (B×N_current×N_0): row j says which original tokens current token j is made of."""
    if source is None:
        source = init_source(batch, plan.num_tokens, device=device)
    return merge_tokens(plan, source, mode="amax")


def log_size_bias(size: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """Proportional attention: the additive attention bias ``log(s_j)`` for every key j, shaped B×1×1×N so that it
    broadcasts over heads and queries (what HF's eager and sdpa attention take as a float ``attention_mask``)."""
    if size is None:
        return None
    bias = size.log()[..., 0][:, None, None, :]
    return bias if dtype is None else bias.to(dtype)


def tokens_by_group(source: torch.Tensor) -> list[list[list[int]]]:
    """For a source map from `merge_source`: per sample, per current token, the original token indices it holds."""
    return [[row.nonzero().flatten().tolist() for row in sample] for sample in source]
