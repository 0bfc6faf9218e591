"""The official C-SGD optimizer parameter groups."""

from __future__ import annotations

from torch import nn


def csgd_param_groups(model: nn.Module, lr: float, weight_decay: float = 1e-4, bias_lr_factor: float = 2.0) -> list:
    """Parameter groups of the official C-SGD optimizer.

    Decay `weight_decay` on kernels, none on biases and norm parameters, biases at `bias_lr_factor` x lr. Clustered
    tensors' decay is taken over by the callback's edit either way.

    Args:
        model (nn.Module): The model to train (its trainable parameters are grouped).
        lr (float): Base learning rate.
        weight_decay (float): Decay of conv/linear kernels.
        bias_lr_factor (float): Learning-rate multiplier of biases.

    Returns:
        list[dict]: Groups for `torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)`.
    """
    decay, no_decay, biases = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("bias"):
            biases.append(p)
        elif p.ndim <= 1:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0},
              {"params": biases, "weight_decay": 0.0, "lr": lr * bias_lr_factor}]
    return [g for g in groups if g["params"]]
