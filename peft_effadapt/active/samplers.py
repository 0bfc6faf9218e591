"""Query strategies over the unlabelled part of the pool: LFTL's contrastive sampler and classic baselines.

All samplers share one interface: `select(pool_ids, probs, n, round_idx=..., seed=...) -> Selection`, where
`pool_ids` (U,) are the ids of the currently unlabelled samples and `probs` (U, C) the current model's softmax on
them (eval mode). They return exactly `n` unique ids taken from `pool_ids`, lowest score first (stable sort, so ties
resolve by position and results do not depend on the platform). Stateful samplers keep their cache in
`state_dict()` (tensors only, saved as safetensors by the loop).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

EPS = 1e-5


@dataclass
class Selection:
    """Queried pool ids (in query order), their scores (lower = queried first) and extra JSON-able facts."""

    pool_ids: list[int]
    scores: list[float]
    extras: dict = field(default_factory=dict)


def _check_inputs(pool_ids: torch.Tensor, probs: torch.Tensor, n: int) -> torch.Tensor:
    pool_ids = torch.as_tensor(pool_ids, dtype=torch.long).flatten()
    if probs.ndim != 2 or probs.shape[0] != pool_ids.numel():
        raise ValueError(f"probs must be (num_unlabelled={pool_ids.numel()}, num_classes), got {tuple(probs.shape)}.")
    if torch.unique(pool_ids).numel() != pool_ids.numel():
        raise ValueError("pool_ids contain duplicates; every unlabelled sample must appear once.")
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"the query size must be a non-negative int, got {n!r}.")
    if n > pool_ids.numel():
        raise ValueError(f"cannot query {n} samples: only {pool_ids.numel()} unlabelled samples are left.")
    return pool_ids


def _lowest(pool_ids: torch.Tensor, scores: torch.Tensor, n: int, extras: dict | None = None) -> Selection:
    order = torch.sort(scores, stable=True).indices[:n]
    return Selection(pool_ids[order].tolist(), scores[order].tolist(), extras or {})


def top2_margin(probs: torch.Tensor) -> torch.Tensor:
    """Best-vs-second-best margin of each row (0 for a single class)."""
    if probs.shape[1] < 2:
        return torch.zeros(probs.shape[0], dtype=probs.dtype)
    top = probs.topk(2, dim=1).values
    return top[:, 0] - top[:, 1]


class ActiveSampler:
    """Base class: subclasses implement `scores` (lower = more worth labelling) or override `select`."""

    name = "base"

    def select(self, pool_ids, probs: torch.Tensor, n: int, *, round_idx: int = 0, seed: int = 0) -> Selection:
        pool_ids = _check_inputs(pool_ids, probs, n)
        return _lowest(pool_ids, self.scores(probs.float()), n)

    def scores(self, probs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got keys {sorted(state)}.")


class RandomSampler(ActiveSampler):
    """Uniformly random queries; the draw depends only on (seed, round), so a resumed round draws the same ids."""

    name = "random"

    def select(self, pool_ids, probs: torch.Tensor, n: int, *, round_idx: int = 0, seed: int = 0) -> Selection:
        pool_ids = _check_inputs(pool_ids, probs, n)
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(round_idx))
        scores = torch.rand(pool_ids.numel(), generator=gen, dtype=torch.float64)
        return _lowest(pool_ids, scores, n)


class EntropySampler(ActiveSampler):
    """Highest predictive entropy first (score = -H(p))."""

    name = "entropy"

    def scores(self, probs):
        return (probs * torch.log(probs + EPS)).sum(1)


class MarginSampler(ActiveSampler):
    """Smallest top-1 minus top-2 probability margin first (BvSB)."""

    name = "margin"

    def scores(self, probs):
        return top2_margin(probs)


class ContrastiveActiveSampler(ActiveSampler):
    """LFTL's Contrastive Active Sampling.

    q = p + alpha * (p - p_prev) with p_prev the probabilities cached at the PREVIOUS query (aligned by pool id; no
    contrast at the first query or for ids without a cached row), u = top1(q) - top2(q) (not renormalised),
    pseudo-labels from the un-contrasted p. With lambda > 0: w[c] = count of class c among the `topk` samples with the
    largest u, divided by the largest count, and u <- u / max(u) + lambda * w[yhat] (max(u) guarded by eps). The `n`
    smallest u are queried; the cache is then replaced by p on the ids left unlabelled.

    Args:
        cd_ratio (float): alpha, the weight of the contrast with the previous query's predictions.
        class_balance_lambda (float): lambda of the class-balance penalty (0 turns it off).
        class_balance_topk (int): kappa, how many of the most certain samples count the classes.
        contrast_space (str): "prob" (the release) or "logprob", which contrasts log-probabilities and applies the
            margin to softmax(log p + alpha * (log p - log p_prev)) (a secondary reading of the paper).

    Raises:
        ValueError: A value out of range or an unknown `contrast_space`.
    """

    name = "contrastive"

    def __init__(self, cd_ratio: float = 0.03, class_balance_lambda: float = 0.1, class_balance_topk: int = 100,
                 contrast_space: str = "prob"):
        if contrast_space not in ("prob", "logprob"):
            raise ValueError(f"contrast_space must be 'prob' or 'logprob', got {contrast_space!r}.")
        if class_balance_topk < 1:
            raise ValueError(f"class_balance_topk must be >= 1, got {class_balance_topk!r}.")
        self.cd_ratio, self.class_balance_lambda = float(cd_ratio), float(class_balance_lambda)
        self.class_balance_topk, self.contrast_space = int(class_balance_topk), contrast_space
        self.prev_ids = torch.zeros(0, dtype=torch.long)
        self.prev_probs = torch.zeros(0, 0)

    def contrast(self, pool_ids: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """q for each row of `probs` (p itself where no previous probabilities are cached)."""
        if self.prev_ids.numel() == 0 or self.cd_ratio == 0:
            return probs.clone()
        if self.prev_probs.shape[1] != probs.shape[1]:
            raise ValueError(f"cached probabilities have {self.prev_probs.shape[1]} classes, the model gives "
                             f"{probs.shape[1]}.")
        lookup = {int(i): k for k, i in enumerate(self.prev_ids.tolist())}
        rows = torch.tensor([lookup.get(int(i), -1) for i in pool_ids.tolist()], dtype=torch.long)
        has = rows >= 0
        prev = probs.clone()
        prev[has] = self.prev_probs[rows[has]].to(probs.dtype)
        if self.contrast_space == "prob":
            return probs + self.cd_ratio * (probs - prev)
        logp, logq = torch.log(probs + EPS), torch.log(prev + EPS)
        return torch.softmax(logp + self.cd_ratio * (logp - logq), dim=1)

    def select(self, pool_ids, probs: torch.Tensor, n: int, *, round_idx: int = 0, seed: int = 0) -> Selection:
        pool_ids = _check_inputs(pool_ids, probs, n)
        probs = probs.float()
        u = top2_margin(self.contrast(pool_ids, probs))
        extras: dict = {}
        if self.class_balance_lambda > 0 and u.numel():
            pseudo = probs.argmax(1)
            k = min(self.class_balance_topk, u.numel())
            confident = torch.sort(u, descending=True, stable=True).indices[:k]
            counts = torch.bincount(pseudo[confident], minlength=probs.shape[1]).float()
            weights = counts / counts.max()
            u = u / u.max().clamp_min(EPS) + self.class_balance_lambda * weights[pseudo]
            extras["class_weights"] = weights.tolist()
        selection = _lowest(pool_ids, u, n, extras)
        keep = ~torch.isin(pool_ids, torch.tensor(selection.pool_ids, dtype=torch.long))
        self.prev_ids, self.prev_probs = pool_ids[keep].clone(), probs[keep].clone()
        return selection

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"prev_ids": self.prev_ids.contiguous(), "prev_probs": self.prev_probs.contiguous()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != {"prev_ids", "prev_probs"}:
            raise ValueError(f"ContrastiveActiveSampler state needs prev_ids and prev_probs, got {sorted(state)}.")
        ids, probs = state["prev_ids"].long(), state["prev_probs"].float()
        if probs.shape[0] != ids.numel() or (ids.numel() and probs.ndim != 2):
            raise ValueError(f"inconsistent sampler state: {ids.numel()} ids, probs {tuple(probs.shape)}.")
        self.prev_ids, self.prev_probs = ids.clone(), probs.clone()


SAMPLERS = {cls.name: cls for cls in (RandomSampler, EntropySampler, MarginSampler, ContrastiveActiveSampler)}
