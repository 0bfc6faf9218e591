"""Constrained adaptive clustering (CAC, spec b.6): refit a codebook only every `t_min` steps at the earliest, and only
when the cluster-index histogram of the current weights has drifted from the one at the last fit by more than a KL
threshold."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kmeans import assign_nearest


def index_histogram(indices: torch.Tensor, k: int, eps: float = 1e-8) -> torch.Tensor:
    """Fractions of entries per cluster index, plus `eps`, renormalised (float64)."""
    counts = torch.bincount(indices.reshape(-1), minlength=k).double()
    hist = counts / counts.sum().clamp_min(1) + eps
    return hist / hist.sum()


def kl_divergence(q: torch.Tensor, p: torch.Tensor) -> float:
    """KL(q || p) = sum q log(q / p) of two histograms."""
    return float((q * (q / p).log()).sum())


# CAC threshold per degree of freedom of the index histogram (2**bits - 1): the drift KL(current || cached) of a
# 2**bits-bin histogram grows with the bin count (median over 300 QCoOp steps on the testbed: 6.2e-4 at 1 bit,
# 3.4e-3 at 2, 1.2e-2 at 4; benchmarks/results/qprompt_refits.json), so one fixed threshold either never refits
# low-bit codebooks (0.02: 0 refits in 300 steps at 1 and 2 bits) or refits high-bit ones at every eligible step.
KL_PER_LEVEL = 3e-4


def default_kl_threshold(bits: int) -> float:
    """The default CAC threshold for a `bits`-bit codebook: KL_PER_LEVEL * (2**bits - 1) [design]."""
    return KL_PER_LEVEL * (2**bits - 1)


@dataclass
class RefitSchedule:
    """State and rule of CAC for one tensor. `step` counts training steps (calls of `should_refit`)."""

    t_min: int = 20
    kl_threshold: float = 0.02
    eps: float = 1e-8
    step: int = 0
    last_fit: int = 0
    refits: int = 0
    reference: torch.Tensor | None = None  # the normalised weights at the last fit (Z_ref)

    def drift(self, z: torch.Tensor, codebook: torch.Tensor) -> float:
        """KL(current || cached) of the index histograms, both assigned with the current codebook."""
        k = codebook.numel()
        p = index_histogram(assign_nearest(self.reference.to(z.device), codebook), k, self.eps)
        q = index_histogram(assign_nearest(z, codebook), k, self.eps)
        return kl_divergence(q, p)

    def should_refit(self, z: torch.Tensor, codebook: torch.Tensor) -> bool:
        """The CAC test at the current step (does not advance the step)."""
        if self.reference is None:
            return True
        if self.step - self.last_fit < self.t_min:
            return False
        return self.drift(z, codebook) > self.kl_threshold

    def fitted(self, z: torch.Tensor, initial: bool = False) -> None:
        """Records a fit on `z` at the current step."""
        self.reference = z.detach().clone()
        self.last_fit = self.step
        if not initial:
            self.refits += 1
