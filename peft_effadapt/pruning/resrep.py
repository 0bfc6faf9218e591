"""ResRep (Ding et al., ICCV 2021) as a `transformers` Trainer callback.

Usage::

    cb = ResRepCallback(flops_target=0.5, mask_interval=200, warmup_steps=1000)
    cb.prepare(model, example_inputs={"pixel_values": x})        # before Trainer(...): compactors must be optimised
    opt = torch.optim.SGD(build_resrep_param_groups(model, lr=0.01), lr=0.01, momentum=0.9)
    trainer = Trainer(model, args, ..., optimizers=(opt, None), callbacks=[cb])
    trainer.train()                                               # slims at the end; cb.plan, <output_dir>/slimmed

Defaults are the official code's (`rr/exp_resrep.py`): lasso 1e-4, masks every 200 steps after 5 epochs, 4 new
channels per update while above target, >= 1 channel per layer, conversion threshold 1e-5, compactor momentum 0.99
and no weight decay on compactors. FLOPs follow `flops.py` (torch's FlopCounterMode on `example_inputs`).
Deviations: the masks are computed on rank 0 and broadcast; the lasso is added once per optimizer step (not per
micro-batch); BatchNorm epsilon is each layer's own; BatchNorms stay (as an "affine" BN carrying the folded bias),
so the slimmed model is the stock HF class; `round_to` (not in the paper) keeps widths at multiples.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import os
import warnings
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .compactor import ResRepCompactor, find_compactor, fold_compactor, insert_compactor, remove_compactor
from .flops import FlopsModel
from .flops import round_to as _round_to
from .groups import ChannelGroup, find_channel_groups
from .plan import GroupPlan, SlimmingPlan, save_slimmed
from .schedule import choose_masks, masked_widths
from .surgery import apply_plan

_RECORD = "_peft_effadapt_resrep"
_ARGS = ("flops_target", "target_modules", "lasso_strength", "mask_interval", "warmup_epochs", "warmup_steps",
         "begin_granularity", "min_channels", "min_keep_ratio", "conversion_threshold", "freeze_masks_after",
         "drop_masked_rows_on_convert", "round_to", "convert_on_train_end", "check_equivalence", "equivalence_tol",
         "save_plan")
_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)


class ResRepCallback(TrainerCallback, ExportableState):
    """Gradient resetting + group lasso on compactors, growing masks until a FLOPs target, lossless conversion.

    Args:
        flops_target: remaining fraction of the model's FLOPs (0.455 for the paper's ResNet-50).
        target_modules: "internal" (the paper's internal conv layers; plain-CNN groups), "mlp" (ViT/CLIP fc1 neurons),
            "all" (both, plus the ResNet stem), or a list of group-name / producer-path globs.
        lasso_strength: lambda of the group-lasso gradient lambda·Q[i]/||Q[i]||, added to every row.
        mask_interval: optimizer steps between mask updates (after the warm-up).
        warmup_epochs, warmup_steps: steps before the first mask update (`warmup_steps` overrides epochs).
        begin_granularity: new masked channels allowed per update while above target.
        min_channels, min_keep_ratio: smallest width per layer (absolute / fraction of the original).
        conversion_threshold: compactor rows with a smaller L2 norm are dropped at conversion.
        freeze_masks_after: fraction of the total steps after which masks stop changing (None: never).
        drop_masked_rows_on_convert: also drop masked rows still above the threshold (reports the error).
        round_to: keep widths at multiples of this (FLOPs are counted with the rounded widths).
        convert_on_train_end, check_equivalence, equivalence_tol: conversion at the end of `train()` and its check
            (max |output before - after| in eval on the example inputs; a larger error warns).
        save_plan: on train end, `save_slimmed` the converted model to `<output_dir>/slimmed` (world process zero).
    """

    def __init__(self, flops_target: float = 0.455, target_modules="internal", lasso_strength: float = 1e-4,
                 mask_interval: int = 200, warmup_epochs: float = 5.0, warmup_steps: int | None = None,
                 begin_granularity: int = 4, min_channels: int = 1, min_keep_ratio: float | None = None,
                 conversion_threshold: float = 1e-5, freeze_masks_after: float | None = None,
                 drop_masked_rows_on_convert: bool = False, round_to: int | None = None,
                 convert_on_train_end: bool = True, check_equivalence: bool = True, equivalence_tol: float = 1e-5,
                 save_plan: bool = True):
        numbers = {"flops_target": flops_target, "lasso_strength": lasso_strength, "mask_interval": mask_interval,
                   "warmup_epochs": warmup_epochs, "begin_granularity": begin_granularity,
                   "min_channels": min_channels, "conversion_threshold": conversion_threshold,
                   "equivalence_tol": equivalence_tol}
        for name, value in numbers.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                raise ValueError(f"{name} must be a number, got {value!r}.")
        if not 0.0 < flops_target < 1.0:
            raise ValueError(f"flops_target is the remaining FLOPs fraction and must lie in (0, 1), got {flops_target}.")
        if mask_interval < 1 or begin_granularity < 1 or min_channels < 1:
            raise ValueError("mask_interval, begin_granularity and min_channels must be >= 1.")
        if lasso_strength < 0:
            raise ValueError(f"lasso_strength must be >= 0, got {lasso_strength}.")
        if freeze_masks_after is not None and not 0.0 < freeze_masks_after <= 1.0:
            raise ValueError(f"freeze_masks_after is a fraction of the training steps in (0, 1], got "
                             f"{freeze_masks_after}.")
        self.flops_target = flops_target
        self.target_modules = target_modules
        self.lasso_strength = lasso_strength
        self.mask_interval = mask_interval
        self.warmup_epochs = warmup_epochs
        self.warmup_steps = warmup_steps
        self.begin_granularity = begin_granularity
        self.min_channels = min_channels
        self.min_keep_ratio = min_keep_ratio
        self.conversion_threshold = conversion_threshold
        self.freeze_masks_after = freeze_masks_after
        self.drop_masked_rows_on_convert = drop_masked_rows_on_convert
        self.round_to = round_to
        self.convert_on_train_end = convert_on_train_end
        self.check_equivalence = check_equivalence
        self.equivalence_tol = equivalence_tol
        self.save_plan = save_plan
        # schedule state (exported to Trainer checkpoints)
        self.mask_updates = 0
        self.last_update_step = 0
        self.target_reached_step: int | None = None
        self.resolved_warmup_steps: int | None = None
        self.freeze_step: int | None = None
        self.masked_flops_ratio = 1.0
        # filled by prepare() / convert()
        self.model: nn.Module | None = None
        self.targets: list[ChannelGroup] = []
        self.flops: FlopsModel | None = None
        self.example_inputs = None
        self.plan: SlimmingPlan | None = None
        self.conversion_error: float | None = None
        self.final_flops_ratio: float | None = None

    # ------------------------------------------------------------------------------------------------- setup
    def prepare(self, model: nn.Module, example_inputs) -> nn.Module:
        """Inserts identity compactors into `model` (its function is unchanged) and measures the FLOPs model on
        `example_inputs` (a tensor, tuple or dict of model inputs; also the batch of the equivalence check). Call
        before `Trainer(...)` builds the optimizer and wraps the model. Idempotent (resume: call it again)."""
        record = model.__dict__.get(_RECORD)
        if record is not None:
            self._adopt(model, record)
            return model
        if example_inputs is None:
            raise ValueError("prepare() needs example_inputs: the FLOPs model and the equivalence check run on them.")
        groups = find_channel_groups(model)
        targets = self._select(groups)
        flops = FlopsModel.measure(model, example_inputs, groups)
        floor = {g.name: self._min_width(g) for g in targets}
        best = flops.ratio(floor)
        if best > self.flops_target:
            raise ValueError(f"flops_target={self.flops_target} is unreachable: pruning every target group "
                             f"({len(targets)}) down to its minimum width leaves {best:.3f} of the FLOPs.")
        for group in targets:
            if group.producers[0][1] == "linear" and group.size ** 2 > model.get_submodule(
                    group.producers[0][0]).weight.numel():
                warnings.warn(f"ResRep compactor on {group.name!r} is {group.size}x{group.size}, larger than the "
                              "layer it prunes (spec d.12); training memory grows accordingly.", stacklevel=2)
        inserted = []
        try:
            for group in targets:
                inserted.append(group)
                insert_compactor(model, group)
        except Exception:
            for group in inserted:
                remove_compactor(model, group)
            raise
        record = {"targets": targets, "flops": flops, "example_inputs": example_inputs}
        model.__dict__[_RECORD] = record
        self._adopt(model, record)
        return model

    def _adopt(self, model: nn.Module, record: dict) -> None:
        self.model, self.targets, self.flops = model, record["targets"], record["flops"]
        self.example_inputs = record["example_inputs"]

    def _select(self, groups: list[ChannelGroup]) -> list[ChannelGroup]:
        spec = self.target_modules
        if spec == "internal":
            chosen = [g for g in groups if g.internal and g.meta.get("role") == "block"]
        elif spec == "mlp":
            chosen = [g for g in groups if g.meta.get("role") == "mlp"]
        elif spec == "all":
            chosen = [g for g in groups if g.internal]
        elif isinstance(spec, (list, tuple)):
            chosen = [g for g in groups if any(fnmatch.fnmatchcase(g.name, p) or
                                               fnmatch.fnmatchcase(g.producers[0][0], p) for p in spec)]
            residual = [g.name for g in chosen if not g.internal]
            if residual:
                raise ValueError(f"ResRep prunes internal layers only; {residual} are residual streams or outputs "
                                 "(use CentripetalSGDCallback for those).")
        else:
            raise ValueError(f"target_modules must be 'internal', 'mlp', 'all' or a list of globs, got {spec!r}.")
        if not chosen:
            raise ValueError(f"Nothing to prune: no channel group matches target_modules={spec!r} (groups found: "
                             f"{[g.name for g in groups]}).")
        return chosen

    def _min_width(self, group: ChannelGroup) -> int:
        low = self.min_channels
        if self.min_keep_ratio:
            low = max(low, math.ceil(self.min_keep_ratio * group.size))
        return _round_to(min(low, group.size), self.round_to, group.size)

    @property
    def compactors(self) -> dict[str, ResRepCompactor]:
        self._require_prepared()
        return {g.name: find_compactor(self.model, g) for g in self.targets}

    def _require_prepared(self):
        if self.model is None:
            raise RuntimeError("ResRepCallback.prepare(model, example_inputs) must run before Trainer(...): compactors "
                               "added later are neither optimised nor synchronised across processes.")

    # ------------------------------------------------------------------------------------------------- rules
    @torch.no_grad()
    def apply_gradient_rule(self, loss_scale: float = 1.0) -> None:
        """grad Q[i] <- m_i·grad Q[i] + lambda·Q[i]/||Q[i]|| for every row (norm clamped at 1e-12). `loss_scale` multiplies
        the lasso term when the task gradients are still loss-scaled."""
        for compactor in self.compactors.values():
            weight = compactor.weight
            lasso = weight.detach() / weight.detach().norm(dim=1, keepdim=True).clamp_min(1e-12)
            lasso = lasso * (self.lasso_strength * loss_scale)
            if weight.grad is None:
                weight.grad = lasso.clone()
            else:
                weight.grad.mul_(compactor.mask[:, None].to(weight.grad.dtype)).add_(lasso.to(weight.grad.dtype))

    @torch.no_grad()
    def update_masks(self) -> dict[str, int]:
        """Recomputes every mask from the compactor row norms (rank 0's choice is broadcast); returns the widths."""
        compactors = self.compactors
        norms = {name: c.row_norms().cpu() for name, c in compactors.items()}
        current = {name: c.mask.detach().cpu() for name, c in compactors.items()}
        masks = choose_masks(norms, self.flops, self.flops_target, current=current,
                             granularity=self.begin_granularity,
                             min_channels={g.name: self._min_width(g) for g in self.targets}, round_to=self.round_to)
        for name, compactor in compactors.items():
            compactor.mask.copy_(masks[name].to(compactor.mask))
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                dist.broadcast(compactor.mask, src=0)
        widths = masked_widths({n: c.mask for n, c in compactors.items()})
        self.mask_updates += 1
        self.masked_flops_ratio = self.flops.ratio(widths)
        return widths

    # ------------------------------------------------------------------------------------------------- Trainer hooks
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        _refuse_sharding(args)
        if self.model is None and model is not None and _RECORD in model.__dict__:
            self._adopt(model, model.__dict__[_RECORD])
        self._require_prepared()
        for name, compactor in self.compactors.items():
            if compactor is None or compactor.weight.dim() != 2 or compactor.weight.shape[0] != compactor.weight.shape[1]:
                raise ValueError(f"Compactor of {name!r} is missing or flattened/sharded; ResRep needs whole D x D "
                                 "compactor matrices (no FSDP/DeepSpeed ZeRO).")
        if optimizer is not None:
            _check_optimizer(optimizer, self.compactors)
        steps_per_epoch = state.max_steps / max(float(state.num_train_epochs or 1), 1e-9)
        self.resolved_warmup_steps = (self.warmup_steps if self.warmup_steps is not None
                                      else int(round(self.warmup_epochs * steps_per_epoch)))
        self.freeze_step = (int(self.freeze_masks_after * state.max_steps) if self.freeze_masks_after is not None
                            else None)
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if state.global_step > 0 and isinstance(saved, Mapping) and saved.get("attributes"):
            for key, value in saved["attributes"].items():
                setattr(self, key, value)

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        scaler = getattr(optimizer, "scaler", None)
        if scaler is not None and scaler.is_enabled():  # fp16: unscale now (accelerate then skips its own unscale)
            with contextlib.suppress(RuntimeError):  # RuntimeError: already unscaled by gradient clipping
                scaler.unscale_(optimizer.optimizer)
        self.apply_gradient_rule()

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        warmup = self.resolved_warmup_steps or 0
        frozen = self.freeze_step is not None and step > self.freeze_step
        if step > warmup and (step - warmup) % self.mask_interval == 0 and not frozen:
            self.update_masks()
            self.last_update_step = step
            if self.target_reached_step is None and self.masked_flops_ratio <= self.flops_target:
                self.target_reached_step = step

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not self.convert_on_train_end:
            return
        if self.target_reached_step is None:
            warnings.warn(f"ResRep masks never reached flops_target={self.flops_target} (masked FLOPs ratio "
                          f"{self.masked_flops_ratio:.3f} after {self.mask_updates} updates); converting anyway. "
                          "Train longer or lower warmup/mask_interval.", stacklevel=2)
        self.convert()
        if self.save_plan and args is not None and args.output_dir and state.is_world_process_zero:
            save_slimmed(self.model, self.plan, os.path.join(args.output_dir, "slimmed"))

    # ------------------------------------------------------------------------------------------------- conversion
    @torch.no_grad()
    def convert(self) -> SlimmingPlan:
        """Folds BatchNorm and compactor into each target producer, drops rows below `conversion_threshold` (and
        masked rows if `drop_masked_rows_on_convert`) from producers and consumers, checks the eval outputs on the
        example inputs, and returns the plan (also `self.plan`). The model is left in eval mode."""
        self._require_prepared()
        model = self.model
        keeps, largest_masked = {}, 0.0
        for name, compactor in self.compactors.items():
            norms = compactor.row_norms()
            if (compactor.mask == 0).any():
                largest_masked = max(largest_masked, float(norms[compactor.mask == 0].max()))
            keep = norms >= self.conversion_threshold
            if self.drop_masked_rows_on_convert:
                keep &= compactor.mask.bool()
            if not keep.any():
                keep[int(norms.argmax())] = True
            keep_idx = torch.nonzero(keep).flatten()
            width = _round_to(int(keep.sum()), self.round_to, keep.numel())
            if width > keep_idx.numel():  # give rows back (largest norms first) to reach a multiple
                extra = [i for i in torch.argsort(norms, descending=True).tolist() if not keep[i]]
                keep_idx = torch.tensor(sorted(keep_idx.tolist() + extra[: width - keep_idx.numel()]))
            keeps[name] = sorted(keep_idx.tolist())
        model.eval()
        before = _output(model, self.example_inputs) if self.check_equivalence else None
        for group in self.targets:
            fold_compactor(model, group)
        plan = SlimmingPlan([GroupPlan(g, keeps[g.name]) for g in self.targets], self.round_to, "resrep",
                            getattr(getattr(model, "config", None), "_name_or_path", None) or None,
                            {"flops_target": self.flops_target, "lasso_strength": self.lasso_strength})
        plan.groups = [p for p in plan.groups if p.width < p.group.size] or plan.groups
        apply_plan(model, plan)
        del model.__dict__[_RECORD]
        self.final_flops_ratio = self.flops.ratio(plan.widths)
        plan.metadata.update(flops_ratio=self.final_flops_ratio, largest_masked_row=largest_masked)
        if before is not None:
            after = _output(model, self.example_inputs)
            self.conversion_error = float((after.float() - before.float()).abs().max())
            plan.metadata["conversion_max_abs_error"] = self.conversion_error
            if self.conversion_error > self.equivalence_tol:
                warnings.warn(f"ResRep conversion changed the outputs by {self.conversion_error:.3g} > "
                              f"{self.equivalence_tol} (rows dropped above the threshold, or masks set too late to "
                              "decay; see freeze_masks_after).", stacklevel=2)
        self.plan = plan
        return plan

    # ------------------------------------------------------------------------------------------------- checkpoints
    def state(self) -> dict:
        return {
            "args": {key: getattr(self, key) for key in _ARGS},
            "attributes": {"mask_updates": self.mask_updates, "last_update_step": self.last_update_step,
                           "target_reached_step": self.target_reached_step,
                           "masked_flops_ratio": self.masked_flops_ratio},
        }


def build_resrep_param_groups(model: nn.Module, lr: float = 0.01, compactor_momentum: float = 0.99,
                              weight_decay: float = 1e-4, bias_lr_mult: float = 2.0) -> list[dict]:
    """The official optimizer groups, for `torch.optim.SGD(groups, lr=lr, momentum=0.9)`: compactors momentum 0.99
    and no decay; conv/linear kernels decay `weight_decay`; norm parameters no decay; biases no decay and
    `bias_lr_mult`·lr. (HF's default AdamW decays HF ResNet BatchNorm weights and would decay compactors.)"""
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


def _refuse_sharding(args) -> None:
    fsdp = getattr(args, "fsdp", None)
    sharded = bool(fsdp) and fsdp not in ("", [], "no")
    deepspeed = bool(getattr(args, "deepspeed", None))
    env = os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" or \
        os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    if sharded or deepspeed or env:
        raise ValueError("ResRep edits compactor gradients row by row; FSDP and DeepSpeed shard or flatten parameters "
                         "so the rows are not available. Use DDP (accelerate launch without FSDP/DeepSpeed).")


def _check_optimizer(optimizer, compactors: Mapping[str, ResRepCompactor]) -> None:
    params = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    missing = [name for name, c in compactors.items() if id(c.weight) not in params]
    if missing:
        raise ValueError(f"The optimizer does not update the ResRep compactors of {missing[:4]}: call "
                         "ResRepCallback.prepare(model, ...) before building the optimizer / Trainer.")
    decayed = [name for name, c in compactors.items() if params[id(c.weight)].get("weight_decay", 0.0)]
    if decayed:
        warnings.warn("Compactors get weight decay from the optimizer; the paper uses none (the lasso is their "
                      "only penalty). Use build_resrep_param_groups.", stacklevel=3)


def _to_device(inputs, device):
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return {k: _to_device(v, device) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_to_device(v, device) for v in inputs)
    return inputs


def _output(model: nn.Module, inputs) -> torch.Tensor:
    device = next(model.parameters()).device
    inputs = _to_device(inputs, device)
    with torch.no_grad():
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
    return next(v for v in (out.values() if isinstance(out, Mapping) else out) if isinstance(v, torch.Tensor))
