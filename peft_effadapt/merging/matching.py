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
"""``f(sources, destinations) -> sources'`` applied to the r source rows (B×r×C, rows in descending match-score
order) and their destination rows gathered before any merge (B×r×C). Rows may carry trailing channels beyond the
model width (`merge_wavg` appends the token size: ``[s·x, s]``); f rewrites the first channels and returns the
others unchanged. PYRA's re-activation is one."""

MAX_PROTECTED = 2


@dataclass(frozen=True)
class MergePlan:
    """What one bipartite matching decided for a batch of sequences of `num_tokens` tokens.

    Stored relative to the *unprotected* tokens of each set (A_u: even positions from ``2 * ceil(p / 2)``, B_u: odd
    positions from ``2 * floor(p / 2) + 1``), with a trailing axis of 1 ready to be expanded over channels: `kept`
    (B×(|A_u|−r)×1, ascending) the A_u tokens that stay, `src` (B×r×1) the A_u tokens merged away, ordered by
    descending similarity score (row k = k-th most similar pair), `dst` (B×r×1) the B_u token each source merges
    into. Several sources may share a destination. `unmerged_idx`, `src_idx` and `dst_idx` give the same indices
    relative to all of A / B (protected tokens included), computed on request.
    """

    num_tokens: int
    r: int
    protected: int
    kept: torch.Tensor | None
    src: torch.Tensor | None
    dst: torch.Tensor | None

    @property
    def num_tokens_after(self) -> int:
        return self.num_tokens - self.r

    @property
    def unmerged_idx(self) -> torch.Tensor | None:
        """B×(|A|−r)×1, ascending: the A tokens that stay (protected ones first)."""
        if self.kept is None:
            return None
        in_a = protected_split(self.protected)[0]
        head = torch.arange(in_a, device=self.kept.device).view(1, -1, 1).expand(self.kept.shape[0], -1, -1)
        return torch.cat([head, self.kept + in_a], dim=1)

    @property
    def src_idx(self) -> torch.Tensor | None:
        """B×r×1: the A tokens merged away (index into all of A), in descending score order."""
        return None if self.src is None else self.src + protected_split(self.protected)[0]

    @property
    def dst_idx(self) -> torch.Tensor | None:
        """B×r×1: the B token (index into all of B) each source merges into."""
        return None if self.dst is None else self.dst + protected_split(self.protected)[1]


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


def protected_split(protected: int) -> tuple[int, int]:
    """(protected tokens in A, protected tokens in B): CLS at 0 is in A, a distillation token at 1 in B."""
    return (protected + 1) // 2, protected // 2


def _unprotected_sets(x: torch.Tensor, protected: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_u, B_u): the unprotected even- and odd-position tokens of a B×N×C tensor (one strided slice each)."""
    in_a, in_b = protected_split(protected)
    return x[:, 2 * in_a :: 2], x[:, 2 * in_b + 1 :: 2]


def bipartite_soft_matching(metric: torch.Tensor, r: int, protected: int = 1) -> MergePlan:
    """Plans the merge of the `r` most similar (A, B) token pairs of every sequence.

    `metric` is B×N×C (e.g. keys averaged over heads); similarity is the cosine of the L2-normalised rows. `r` is
    clamped to ``max_mergeable(N, protected)`` as in the reference ToMe. Protected tokens take no part in the
    matching (the reference gives them a score of −inf: the same plan). The plan is computed without gradient: the
    matching indices are not differentiated, the merge that uses them is.
    """
    _check_protected(protected)
    num_tokens = metric.shape[1]
    r = min(int(r), max_mergeable(num_tokens, protected))
    if r <= 0:
        return MergePlan(num_tokens, 0, protected, None, None, None)
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = _unprotected_sets(metric, protected)
        node_max, node_idx = torch.bmm(a, b.transpose(1, 2)).max(dim=-1, keepdim=True)
        edge_idx = node_max.argsort(dim=1, descending=True)
        src, rest = edge_idx.split([r, edge_idx.shape[1] - r], dim=1)
        kept = rest.sort(dim=1).values  # keep the original order
        dst = node_idx.gather(dim=1, index=src)
    return MergePlan(num_tokens, r, protected, kept, src, dst)


def merge_tokens(
    plan: MergePlan, x: torch.Tensor, mode: str = "mean", modulate: Modulation | None = None
) -> torch.Tensor:
    """Applies `plan` to a B×N×C tensor: sources are reduced (``"sum"``, ``"mean"``, ``"amax"``) into their
    destinations. `modulate`, if given, rewrites the source rows before the reduction (see `Modulation`).

    Output order: ``[protected tokens, kept A_u, B_u]``; two gathers from A_u and one scatter into B_u."""
    if plan.r == 0:
        return x
    if x.shape[1] != plan.num_tokens:
        raise ValueError(f"the merge plan is for {plan.num_tokens} tokens, got a tensor with {x.shape[1]}.")
    channels = x.shape[-1]
    a, b = _unprotected_sets(x, plan.protected)
    kept = a.gather(dim=1, index=plan.kept.expand(-1, -1, channels))
    src = a.gather(dim=1, index=plan.src.expand(-1, -1, channels))
    dst_index = plan.dst.expand(-1, -1, channels)
    if modulate is not None:
        src = modulate(src, b.gather(dim=1, index=dst_index))
    b = b.scatter_reduce(1, dst_index, src, reduce=mode)
    return torch.cat([kept, b] if plan.protected == 0 else [x[:, : plan.protected], kept, b], dim=1)


def pack_weighted(x: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """``[x·s, s]`` (B×N×(C+1)): what a size-weighted merge sums, in one tensor, so that one gather/scatter moves
    both."""
    return torch.cat([x * size, size], dim=-1)


def unpack_weighted(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `pack_weighted` after a sum-merge: ``(Σ s·x / Σ s, Σ s)``."""
    weighted, size = packed.split([packed.shape[-1] - 1, 1], dim=-1)
    return weighted / size, size


def merge_wavg(
    plan: MergePlan, x: torch.Tensor, size: torch.Tensor | None = None, modulate: Modulation | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted merge: each destination becomes ``(s_b x_b + Σ s_i x_i) / (s_b + Σ s_i)`` and its size the sum.

    `size` is B×N×1 (None: every token has size 1). x·s and s are merged as one packed tensor (`pack_weighted`), so
    `modulate` sees packed rows ``[s_i x_i, s_i]`` and must return the size channel unchanged (see `Modulation`).
    Returns ``(x, size)`` for the shorter sequence.
    """
    if size is None:
        size = torch.ones_like(x[..., :1])
    if plan.r == 0:
        return x, size
    return unpack_weighted(merge_tokens(plan, pack_weighted(x, size), mode="sum", modulate=modulate))


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
    bias = size.log().reshape(size.shape[0], 1, 1, -1)
    return bias if dtype is None else bias.to(dtype)


def tokens_by_group(source: torch.Tensor) -> list[list[list[int]]]:
    """For a source map from `merge_source`: per sample, per current token, the original token indices it holds."""
    return [[row.nonzero().flatten().tolist() for row in sample] for sample in source]
