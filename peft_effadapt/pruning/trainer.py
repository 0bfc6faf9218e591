"""The Trainer core shared by the pruning callbacks: FSDP/DeepSpeed refusal, the optimizer check (parameters present,
adaptive optimizers refused with the method's reason), the pending fp16 loss scale, rank-0 broadcast, the output
comparison of the slimming check, resume of callback state, and `PruningCallback`, their common base."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Mapping

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .config import PruningConfig
from .slimmed import save_slimmed

logger = logging.getLogger(__name__)


def refuse_sharding(method: str, model: nn.Module | None = None, args=None) -> None:
    """Raises `ValueError` when FSDP or DeepSpeed is enabled (arguments, accelerate environment, or sharded /
    flattened parameters): both methods edit whole output-channel rows, which those engines split or flatten."""
    why = None
    fsdp = getattr(args, "fsdp", None)
    if args is not None and ((fsdp and fsdp not in ("", [], "no")) or getattr(args, "deepspeed", None)):
        why = "the TrainingArguments enable FSDP/DeepSpeed"
    elif os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        why = "accelerate is configured for FSDP (ACCELERATE_USE_FSDP)"
    elif os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        why = "accelerate is configured for DeepSpeed (ACCELERATE_USE_DEEPSPEED)"
    elif model is not None:
        for name, p in model.named_parameters():
            if type(p).__name__ in ("DTensor", "FlatParameter") or hasattr(p, "ds_id") or hasattr(p, "_is_flat_param"):
                why = f"parameter {name} is sharded or flattened ({type(p).__name__})"
                break
    if why:
        raise ValueError(f"{method} edits whole output-channel rows, which FSDP and DeepSpeed-ZeRO shard or flatten "
                         f"({why}); train with plain data parallelism (`accelerate launch` / torchrun without "
                         "FSDP/DeepSpeed) instead.")


def inner_optimizer(optimizer):
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):  # accelerate's wrapper
        optimizer = optimizer.optimizer
    return optimizer


def check_optimizer(optimizer, params: Mapping[str, nn.Parameter], method: str, *, allow_adaptive: bool,
                    reason: str, fix: str) -> tuple[dict, bool]:
    """Checks that `optimizer` updates every parameter in `params` ({name: parameter}) and is `torch.optim.SGD`
    (adaptive optimizers are refused with `reason`, or only warned about when `allow_adaptive`). Returns
    `({id(param): its param group}, is_sgd)`."""
    inner = inner_optimizer(optimizer)
    group_of = {id(p): g for g in inner.param_groups for p in g["params"]}
    missing = [name for name, p in params.items() if id(p) not in group_of]
    if missing:
        raise ValueError(f"The optimizer does not update {method}'s parameters {missing[:4]}"
                         f"{' ...' if len(missing) > 4 else ''}: {fix}")
    sgd = isinstance(inner, torch.optim.SGD)
    if not sgd:
        message = f"{method} needs torch.optim.SGD (with momentum); got {type(inner).__name__}: {reason}"
        if not allow_adaptive:
            raise ValueError(f"{message}. {fix}, or set allow_adaptive_optimizer=True to accept it anyway.")
        warnings.warn(message, stacklevel=3)
    return group_of, sgd


def pending_grad_scale(optimizer) -> float:
    """Loss scale still multiplied into the gradients (fp16 GradScaler not yet unscaled for this step), else 1.
    Both methods add their regulariser scaled by it, so it comes out right after accelerate unscales."""
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
    """Rank 0's object on every rank (clusters / masks must be identical everywhere); identity without
    torch.distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def check_inputs_for(model: nn.Module, inputs):
    """`inputs` (a dict of model inputs, a tuple or a tensor) without labels, floats as float32 unless the model is
    in another float dtype, on the model's device."""
    param = next(model.parameters())

    def fix(v):
        if not torch.is_tensor(v):
            return v
        v = v.to(param.device)
        return v.to(param.dtype) if v.is_floating_point() and param.is_floating_point() else v

    if isinstance(inputs, Mapping):
        return {k: fix(v) for k, v in inputs.items() if k not in ("labels", "label")}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(fix(v) for v in inputs)
    return fix(inputs)


@torch.no_grad()
@contextlib.contextmanager
def own_precision(model: nn.Module):
    """Runs `model` in its own dtype for the duration, autocast off. A `Trainer` run in bf16/fp16 leaves the model's
    forward wrapped by accelerate in an autocast context (the instance attribute `forward`, the original kept as
    `_original_forward`), which an outer `torch.autocast(enabled=False)` cannot switch off; the original forward is
    put back for the duration, so hooks still run through `nn.Module.__call__`."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    original = model.__dict__.get("_original_forward")
    wrapped = model.__dict__.get("forward")
    if original is not None and wrapped is not None:
        model.forward = original
    try:
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        if original is not None and wrapped is not None:
            model.forward = wrapped


def model_output(model: nn.Module, inputs) -> torch.Tensor:
    """The tensor both methods compare: `logits` of an HF output, else the (first) output tensor. Computed in the
    model's own dtype (`own_precision`), so a check at the end of a mixed-precision `Trainer` run compares fp32
    outputs, not their bf16 rounding."""
    inputs = check_inputs_for(model, inputs)
    with own_precision(model):
        if isinstance(inputs, Mapping):
            out = model(**inputs)
        elif isinstance(inputs, (tuple, list)):
            out = model(*inputs)
        else:
            out = model(inputs)
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    values = out.values() if isinstance(out, Mapping) else out
    return next(v for v in values if isinstance(v, torch.Tensor))


def output_change(before: torch.Tensor, after: torch.Tensor) -> tuple[float, float]:
    """Largest |after - before| and largest |before| (the slimming check allows `tol * max(1, the latter)`)."""
    before, after = before.float(), after.float()
    return float((after - before).abs().max()), float(before.abs().max())


def max_output_diff(a: nn.Module, b: nn.Module, inputs) -> tuple[float, float]:
    """Largest |output change| from `a` to `b` and largest |output| of `a`."""
    return output_change(model_output(a, inputs), model_output(b, inputs))


class PruningCallback(TrainerCallback, ExportableState):
    """Base of the C-SGD and ResRep callbacks: holds the validated config (`self.config`; its fields are also read
    as attributes), refuses sharded training, restores the schedule state on resume (from the checkpoint's
    trainer state, with or without `restore_callback_states_from_checkpoint`) and saves the slimmed model."""

    method = "pruning"
    config_class = PruningConfig
    _state_attributes: tuple[str, ...] = ()

    def __init__(self, config: PruningConfig | None = None, **kwargs):
        if config is None:
            config = self.config_class(**kwargs)
        elif kwargs:
            raise TypeError(f"Pass either a {self.config_class.__name__} or keyword options, not both "
                            f"(got config and {sorted(kwargs)}).")
        elif not isinstance(config, self.config_class):
            raise TypeError(f"config must be a {self.config_class.__name__}, got {type(config).__name__}.")
        self.config = config

    def __getattr__(self, name):  # config fields read as attributes (cb.round_to, cb.flops_target, ...)
        config = self.__dict__.get("config")
        if config is not None and name in getattr(config, "__dataclass_fields__", {}):
            return getattr(config, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # ------------------------------------------------------------------------------------------------- state
    def state(self) -> dict:
        return {"args": self.config.to_dict(),
                "attributes": {k: _jsonable(getattr(self, k)) for k in self._state_attributes}}

    def restore(self, state) -> bool:
        """On resume (global_step > 0), sets the saved schedule attributes from the checkpoint's trainer state;
        returns whether anything was restored."""
        saved = (getattr(state, "stateful_callbacks", None) or {}).get(type(self).__name__)
        if getattr(state, "global_step", 0) > 0 and isinstance(saved, Mapping) and saved.get("attributes"):
            for key, value in saved["attributes"].items():
                if key in self._state_attributes:
                    setattr(self, key, value)
            return True
        return False

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        refuse_sharding(self.method, model, args)
        self.restore(state)

    def save_slimmed_model(self, model: nn.Module, args, state) -> str | None:
        """Writes the slimmed model to `save_dir` (inside `args.output_dir` when relative) on the main process."""
        if not self.config.save_dir or args is None or not getattr(args, "should_save", True):
            return None
        directory = os.path.join(getattr(args, "output_dir", None) or ".", self.config.save_dir)
        save_slimmed(model, self.plan, directory)
        return directory


def _jsonable(value):
    if isinstance(value, Mapping):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
