"""VPA losses: SHOT information maximisation and the entropy over cosine similarities to the anchor memory."""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-5  # inside every log, as in the official code


def entropy(probs: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Row-wise entropy -sum p log(p + eps)."""
    return -(probs * torch.log(probs + eps)).sum(-1)


def information_maximization(probs: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """SHOT's IM loss: mean_i H(p_i) - H(mean_i p_i) (confident and diverse predictions minimise it)."""
    if probs.shape[0] == 0:
        return probs.sum() * 0
    return entropy(probs, eps).mean() - entropy(probs.mean(0), eps)


def anchor_entropy(features: torch.Tensor, anchors: torch.Tensor, temperature: float = 1.0,
                   eps: float = 1e-8) -> torch.Tensor:
    """L_vpa: mean_i H(softmax_j cos(z_i, M_j) / T) over all anchors j; no gradient into `anchors`.

    Cosines use a norm floor `eps` (the release divides by raw norms and gives NaN for an all-zero memory row).
    """
    if features.shape[0] == 0 or anchors.shape[0] == 0:
        return features.sum() * 0
    cos = F.normalize(features, dim=1, eps=eps) @ F.normalize(anchors.detach(), dim=1, eps=eps).T
    return entropy(torch.softmax(cos / temperature, dim=1)).mean()


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft (e.g. mixed one-hot) targets."""
    return -(targets * torch.log_softmax(logits, dim=1)).sum(1).mean()


def vpa_loss(labelled_logits: torch.Tensor, labels: torch.Tensor, unlabelled_logits: torch.Tensor,
             unlabelled_features: torch.Tensor, anchors: torch.Tensor, beta_im: float = 0.9, beta_vpa: float = 1.0,
             temperature: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """L = CE(labelled) + beta_im * IM(unlabelled) + beta_vpa * L_vpa(unlabelled features, anchors)."""
    ce = F.cross_entropy(labelled_logits, labels) if labels.numel() else labelled_logits.sum() * 0
    im = information_maximization(torch.softmax(unlabelled_logits, dim=1)) if beta_im else ce * 0
    vpa = anchor_entropy(unlabelled_features, anchors, temperature) if beta_vpa else ce * 0
    total = ce + beta_im * im + beta_vpa * vpa
    return total, {"ce": float(ce.detach()), "im": float(im.detach()), "vpa": float(vpa.detach())}
