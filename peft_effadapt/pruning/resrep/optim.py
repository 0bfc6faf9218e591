"""The official ResRep optimizer parameter groups."""

from __future__ import annotations

from torch import nn

from .compactor import ResRepCompactor

_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)


def resrep_param_groups(model: nn.Module, lr: float = 0.01, compactor_momentum: float = 0.99,
                        weight_decay: float = 1e-4, bias_lr_mult: float = 2.0) -> list[dict]:
    """The official ResRep optimizer groups.

    Compactors: momentum `compactor_momentum` and no decay; conv/linear kernels decay `weight_decay`; norm parameters
    no decay; biases no decay and `bias_lr_mult`·lr. (HF's default AdamW decays HF ResNet BatchNorm weights and would
    decay compactors.) Call it after `ResRepCallback.prepare`, which inserts the compactors.

    Args:
        model (nn.Module): The prepared model.
        lr (float): Base learning rate.
        compactor_momentum (float): Momentum of the compactors' group.
        weight_decay (float): Decay of conv/linear kernels.
        bias_lr_mult (float): Learning-rate multiplier of biases.

    Returns:
        list[dict]: Groups for `torch.optim.SGD(groups, lr=lr, momentum=0.9)`.
    """
    compactor, kernels, norms, biases = [], [], [], []
    owners = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners[id(param)] = module
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        owner = owners.get(id(param))
        if isinstance(owner, ResRepCompactor):
            compactor.append(param)
        elif isinstance(owner, _NORM_TYPES):
            norms.append(param)
        elif name.endswith("bias"):
            biases.append(param)
        else:
            kernels.append(param)
    groups = [{"params": compactor, "lr": lr, "momentum": compactor_momentum, "weight_decay": 0.0},
              {"params": kernels, "lr": lr, "weight_decay": weight_decay},
              {"params": norms, "lr": lr, "weight_decay": 0.0},
              {"params": biases, "lr": lr * bias_lr_mult, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
