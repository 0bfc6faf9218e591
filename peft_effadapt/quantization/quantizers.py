"""Tensor quantisers used as prompt regularisers (spec b.3, b.5): K-means codebook on z-score-normalised weights with
CAC refits (QPrompt), and two ablation baselines, a uniform min-max quantiser and Gaussian weight noise.

Every quantiser maps a latent fp32 tensor P to the values used in the forward pass. The codebook quantisers return
the values through their storage form: a codebook de-normalised (sd * C + mu) and rounded to `codebook_dtype`
(fp16), looked up by index, so that what is evaluated is exactly what is saved (spec pitfall 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .kmeans import assign_nearest, kmeans_1d
from .packing import check_bits
from .schedule import RefitSchedule, default_kl_threshold

REFIT_MODES = ("cac", "always", "never")


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, latent, values):  # noqa: ARG004 - latent only routes the gradient
        return values.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def straight_through(latent: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Forward: exactly `values`; backward: the upstream gradient passes unchanged to `latent` (dQ/dP = 1)."""
    return _StraightThrough.apply(latent, values.detach().to(latent.dtype))


def normalize(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Z, mu, sd) with Z = (P - mu) / sd over the whole tensor (population std; sd = 1 for a constant tensor).
    mu and sd are statistics of the current tensor, constants for the backward pass (spec b.5)."""
    p = p.detach()
    mu = p.mean()
    sd = p.std(unbiased=False) if p.numel() > 1 else torch.ones((), dtype=p.dtype, device=p.device)
    sd = torch.where(sd > 1e-12, sd, torch.ones_like(sd))
    return (p - mu) / sd, mu, sd


@dataclass
class Quantized:
    """Forward values (latent dtype) and, for codebook quantisers, the indices and stored codebook."""

    values: torch.Tensor
    indices: torch.Tensor | None = None
    codebook: torch.Tensor | None = None


@dataclass
class KMeansQuantizer:
    """b-bit K-means codebook quantiser with constrained adaptive clustering (spec b.5, b.6).

    `refit`: 'cac' (default: refit after `t_min` steps when KL(current || cached) of the index histograms exceeds
    `kl_threshold`, by default `default_kl_threshold(bits)` = 3e-4 * (2**bits - 1)), 'always' (every training step: the ablation the paper argues against), 'never' (one fit).
    `normalize=False` fits the codebook to the raw weights (the "K-means only" ablation). The first fit happens at the
    first call; later fits warm-start from the previous codebook. Only calls with `training=True` advance the step.
    """

    bits: int = 1
    normalize: bool = True
    refit: str = "cac"
    t_min: int = 20
    kl_threshold: float | None = None  # None: default_kl_threshold(bits)
    eps: float = 1e-8
    max_iter: int = 100
    tol: float = 1e-6
    codebook_dtype: torch.dtype = torch.float16
    codebook: torch.Tensor | None = None  # in normalised space, sorted, fp32
    schedule: RefitSchedule = field(default=None)

    def __post_init__(self):
        check_bits(self.bits)
        if self.refit not in REFIT_MODES:
            raise ValueError(f"refit must be one of {REFIT_MODES}, got {self.refit!r}.")
        if self.kl_threshold is None:
            self.kl_threshold = default_kl_threshold(self.bits)
        if self.schedule is None:
            self.schedule = RefitSchedule(self.t_min, self.kl_threshold, self.eps)

    @property
    def levels(self) -> int:
        return 2**self.bits

    @property
    def refits(self) -> int:
        return self.schedule.refits

    def _normalized(self, p: torch.Tensor):
        if self.normalize:
            return normalize(p)
        p = p.detach()
        return p, torch.zeros((), dtype=p.dtype, device=p.device), torch.ones((), dtype=p.dtype, device=p.device)

    def fit(self, z: torch.Tensor, initial: bool = False) -> None:
        init = None if self.codebook is None else self.codebook.to(z.device)
        self.codebook = kmeans_1d(z.float(), self.levels, init=init, max_iter=self.max_iter, tol=self.tol)
        self.schedule.fitted(z, initial=initial)

    def __call__(self, p: torch.Tensor, training: bool = False) -> Quantized:
        z, mu, sd = self._normalized(p)
        if self.codebook is None:
            self.fit(z, initial=True)
        elif training and (self.refit == "always" or (self.refit == "cac" and self.schedule.should_refit(
                z, self.codebook.to(z.device)))):
            self.fit(z)
        if training:
            self.schedule.step += 1
        codebook = self.codebook.to(device=z.device, dtype=z.dtype)
        indices = assign_nearest(z, codebook)
        stored = (sd * codebook + mu).to(self.codebook_dtype)
        return Quantized(stored.to(p.dtype)[indices], indices, stored)

    def set_codebook(self, stored: torch.Tensor, p: torch.Tensor) -> None:
        """Adopts a stored (de-normalised) codebook for latent `p`, e.g. after loading: C = (codebook - mu) / sd."""
        z, mu, sd = self._normalized(p)
        self.codebook, _ = torch.sort(((stored.to(z.dtype).to(z.device) - mu) / sd).float())
        self.schedule.fitted(z, initial=True)


@dataclass
class UniformQuantizer:
    """b-bit uniform min-max quantiser (ablation baseline, spec b.5 [design]): 2^b evenly spaced levels from min(P)
    to max(P), nearest level, STE in the layer. Same storage form as the K-means quantiser."""

    bits: int = 1
    codebook_dtype: torch.dtype = torch.float16

    def __post_init__(self):
        check_bits(self.bits)

    def __call__(self, p: torch.Tensor, training: bool = False) -> Quantized:  # noqa: ARG002 - stateless
        p = p.detach()
        lo, hi = p.min(), p.max()
        k = 2**self.bits
        span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
        indices = torch.round((p - lo) / span * (k - 1)).clamp(0, k - 1).to(torch.long)
        stored = (lo + span * torch.arange(k, dtype=p.dtype, device=p.device) / max(k - 1, 1)).to(self.codebook_dtype)
        return Quantized(stored.to(p.dtype)[indices], indices, stored)


@dataclass
class GaussianNoise:
    """Adds N(0, std^2) to the weights in training, the identity in eval (spec b.3 motivating baseline).
    `relative=True` scales std by the tensor's own std."""

    std: float = 0.01
    relative: bool = False

    def __call__(self, p: torch.Tensor, training: bool = False) -> Quantized:
        p = p.detach()
        if not training or self.std == 0:
            return Quantized(p)
        scale = self.std * (p.std(unbiased=False) if self.relative else 1.0)
        return Quantized(p + torch.randn_like(p) * scale)


@dataclass
class Identity:
    """No quantisation (the host method)."""

    def __call__(self, p: torch.Tensor, training: bool = False) -> Quantized:  # noqa: ARG002
        return Quantized(p.detach())
