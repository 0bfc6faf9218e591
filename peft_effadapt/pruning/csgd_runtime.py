"""Training-stack plumbing of the C-SGD callback: FSDP/DeepSpeed refusal, optimizer unwrapping, pending fp16 loss
scale, rank-0 broadcast, and the output comparison of the trim check."""

from __future__ import annotations

import os

import torch
from torch import nn


def check_not_sharded(model: nn.Module, args=None) -> None:
    why = None
    if args is not None and (getattr(args, "fsdp", None) or getattr(args, "deepspeed", None)):
        why = "the TrainingArguments enable FSDP/DeepSpeed"
    elif os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        why = "accelerate is configured for FSDP"
    elif os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        why = "accelerate is configured for DeepSpeed"
    else:
        for name, p in model.named_parameters():
            if type(p).__name__ in ("DTensor", "FlatParameter") or hasattr(p, "ds_id") or hasattr(p, "_is_flat_param"):
                why = f"parameter {name} is sharded or flattened ({type(p).__name__})"
                break
    if why:
        raise ValueError(f"C-SGD edits whole output-channel rows of every clustered tensor, which FSDP and "
                         f"DeepSpeed-ZeRO shard or flatten ({why}); train with plain data parallelism "
                         f"(`accelerate launch` / torchrun without FSDP/DeepSpeed) instead")


def inner_optimizer(optimizer):
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):  # accelerate's wrapper
        optimizer = optimizer.optimizer
    return optimizer


def pending_grad_scale(optimizer) -> float:
    """Loss scale still multiplied into the gradients (fp16 GradScaler not yet unscaled for this step), else 1."""
    scaler = getattr(optimizer, "scaler", None)
    if scaler is None or not getattr(scaler, "is_enabled", lambda: False)():
        return 1.0
    try:
        from torch.amp.grad_scaler import OptState

        state = scaler._per_optimizer_states[id(inner_optimizer(optimizer))]
        if state.get("stage") is OptState.UNSCALED:
            return 1.0
    except (ImportError, AttributeError, KeyError):
        pass
    return float(scaler.get_scale())


def is_rank0() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def broadcast_from_rank0(obj):
    """Rank 0's object on every rank (clusters must be identical everywhere); identity without torch.distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def model_output(model: nn.Module, inputs):
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    out = getattr(out, "logits", out)
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def max_output_diff(a: nn.Module, b: nn.Module, inputs) -> tuple[float, float]:
    """Largest |output change| and largest |output| of `a`."""
    if isinstance(inputs, dict) or hasattr(inputs, "keys"):
        inputs = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v)
                  for k, v in inputs.items() if k not in ("labels", "label")}
    elif torch.is_tensor(inputs) and inputs.is_floating_point():
        inputs = inputs.float()
    device = next(a.parameters()).device
    if isinstance(inputs, dict):
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
    else:
        inputs = inputs.to(device)
    ref = model_output(a, inputs)
    return float((ref - model_output(b, inputs)).abs().max()), float(ref.abs().max())
