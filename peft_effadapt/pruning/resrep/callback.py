"""ResRep (Ding et al., ICCV 2021) as a `transformers` Trainer callback.

Usage::

    cb = ResRepCallback(flops_target=0.5, mask_interval=200, warmup_steps=1000)  # or ResRepCallback(ResRepConfig(...))
    cb.prepare(model, example_inputs={"pixel_values": x})        # before Trainer(...): compactors must be optimised
    opt = torch.optim.SGD(resrep_param_groups(model, lr=0.01), lr=0.01, momentum=0.9)
    trainer = Trainer(model, args, ..., optimizers=(opt, None), callbacks=[cb])
    trainer.train()                                               # slims at the end; cb.plan, <output_dir>/slimmed

Defaults are the official code's (`rr/exp_resrep.py`): lasso 1e-4, masks every 200 steps after 5 epochs, 4 new
channels per update while above target, >= 1 channel per layer, conversion threshold 1e-5, compactor momentum 0.99
and no weight decay on compactors. FLOPs follow `flops.py` (torch's FlopCounterMode on `example_inputs`).
Deviations: the masks are computed on rank 0 and broadcast; the lasso is added once per optimizer step (not per
micro-batch), multiplied by a pending fp16 loss scale; BatchNorm epsilon is each layer's own; BatchNorms stay (as an
"affine" BN carrying the folded bias), so the slimmed model is the stock HF class; `round_to` (not in the paper)
keeps widths at multiples (`"auto"`: for the device the model trains on, resolved at `prepare` and again at train
begin); `groups="streams"`/`"all"` (not in the paper) also prune residual streams, one compactor
shared by every producer of a stream. Adaptive optimizers are refused: Adam rescales the lasso gradient per element,
so `lasso_strength` would no longer be the paper's lambda.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist
from torch import nn

from ..flops import FlopsModel
from ..flops import round_to as _round_to
from ..groups import ChannelGroup, find_channel_groups, select_groups
from ..plan import GroupPlan, SlimmingPlan
from ..surgery import apply_plan
from ..trainer import PruningCallback, check_optimizer, model_output, output_change, pending_grad_scale
from .compactor import ResRepCompactor, check_group, find_compactor, fold_compactor, insert_compactor, remove_compactor
from .config import ResRepConfig
from .schedule import choose_masks, masked_widths

_RECORD = "_peft_effadapt_resrep"
_ADAPTIVE_REASON = ("Adam-type optimizers rescale the group-lasso gradient per element, so lasso_strength no longer "
                    "is the paper's lambda and masked rows do not decay as the schedule assumes")


class ResRepCallback(PruningCallback):
    """ResRep as a `transformers.Trainer` callback.

    Gradient resetting and group lasso on compactors, masks that grow until a FLOPs target, lossless conversion to
    narrower layers at train end (saved with its plan to `save_dir`).

    Args:
        config (ResRepConfig | None): The options; or give its fields as keyword arguments instead.
        **kwargs: [`ResRepConfig`] fields, when no config is given.

    Raises:
        ValueError: Bad options (from [`ResRepConfig`]), an FSDP/DeepSpeed run, or an adaptive optimizer without
            `allow_adaptive_optimizer=True`.

    Example:
        ```python
        from peft_effadapt import ResRepCallback
        from peft_effadapt.testing import load_tiny_resnet, tiny_pixel_values

        model, _ = load_tiny_resnet()
        callback = ResRepCallback(flops_target=0.7)
        callback.prepare(model, example_inputs={"pixel_values": tiny_pixel_values(2, 32)})  # before the optimizer
        ```
    """

    method = "ResRep"
    config_class = ResRepConfig
    _state_attributes = ("mask_updates", "last_update_step", "target_reached_step", "masked_flops_ratio")

    def __init__(self, config: ResRepConfig | None = None, **kwargs):
        super().__init__(config, **kwargs)
        # schedule state (exported to Trainer checkpoints)
        self.mask_updates = 0
        self.last_update_step = 0
        self.target_reached_step: int | None = None
        self.resolved_warmup_steps: int | None = None
        self.freeze_step: int | None = None
        self.masked_flops_ratio = 1.0
        # filled by prepare() / slim()
        self.model: nn.Module | None = None
        self.targets: list[ChannelGroup] = []
        self.flops: FlopsModel | None = None
        self.example_inputs = None
        self.plan: SlimmingPlan | None = None
        self.conversion_error: float | None = None
        self.final_flops_ratio: float | None = None
        self.multiple: int | None = None  # round_to resolved on the model's device (prepare, then train begin)

    # ------------------------------------------------------------------------------------------------- setup
    def prepare(self, model: nn.Module, example_inputs) -> nn.Module:
        """Inserts identity compactors into `model` (its function is unchanged) and measures the FLOPs model on
        `example_inputs` (a tensor, tuple or dict of model inputs; also the batch of the equivalence check). Call
        before `Trainer(...)` builds the optimizer and wraps the model. Idempotent (resume: call it again)."""
        self.multiple = self.config.multiple(model)
        record = model.__dict__.get(_RECORD)
        if record is not None:
            self._adopt(model, record)
            return model
        if example_inputs is None:
            raise ValueError("prepare() needs example_inputs: the FLOPs model and the equivalence check run on them.")
        groups = find_channel_groups(model, example_inputs)
        targets = select_groups(groups, self.config.groups)
        for group in targets:
            check_group(model, group)
        flops = FlopsModel.measure(model, example_inputs, groups)
        floor = {g.name: self._min_width(g) for g in targets}
        best = flops.ratio(floor)
        if best > self.flops_target:
            raise ValueError(f"flops_target={self.flops_target} is unreachable: pruning every target group "
                             f"({len(targets)}, groups={self.config.groups!r}) down to its minimum width leaves "
                             f"{best:.3f} of the FLOPs.")
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

    def _min_width(self, group: ChannelGroup) -> int:
        low = self.min_channels
        if self.min_keep_ratio:
            low = max(low, math.ceil(self.min_keep_ratio * group.size))
        return _round_to(min(low, group.size), self.multiple, group.size)

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
        """grad Q[i] <- m_i·grad Q[i] + lambda·Q[i]/||Q[i]|| for every row (norm clamped at 1e-12). `loss_scale`
        multiplies the lasso term when the task gradients are still loss-scaled."""
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
                             min_channels={g.name: self._min_width(g) for g in self.targets},
                             round_to=self.multiple)
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
        super().on_train_begin(args, state, control, model=model, optimizer=optimizer, **kwargs)
        if self.model is None and model is not None and _RECORD in model.__dict__:
            self._adopt(model, model.__dict__[_RECORD])
        self._require_prepared()
        self.multiple = self.config.multiple(self.model)  # round_to="auto": the device the model trains on
        for name, compactor in self.compactors.items():
            if compactor is None or compactor.weight.dim() != 2 or compactor.weight.shape[0] != compactor.weight.shape[1]:
                raise ValueError(f"Compactor of {name!r} is missing or flattened/sharded; ResRep needs whole D x D "
                                 "compactor matrices (no FSDP/DeepSpeed ZeRO).")
        if optimizer is not None:
            group_of, _ = check_optimizer(
                optimizer, {n: c.weight for n, c in self.compactors.items()}, self.method,
                allow_adaptive=self.allow_adaptive_optimizer, reason=_ADAPTIVE_REASON,
                fix="call ResRepCallback.prepare(model, ...) before building the optimizer, and use "
                    "torch.optim.SGD(resrep_param_groups(model, lr), lr, momentum=0.9)")
            if any(group_of[id(c.weight)].get("weight_decay", 0.0) for c in self.compactors.values()):
                warnings.warn("Compactors get weight decay from the optimizer; the paper uses none (the lasso is "
                              "their only penalty). Use resrep_param_groups.", stacklevel=2)
        steps_per_epoch = state.max_steps / max(float(state.num_train_epochs or 1), 1e-9)
        self.resolved_warmup_steps = (self.warmup_steps if self.warmup_steps is not None
                                      else int(round(self.warmup_epochs * steps_per_epoch)))
        self.freeze_step = (int(self.freeze_masks_after * state.max_steps) if self.freeze_masks_after is not None
                            else None)

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.apply_gradient_rule(pending_grad_scale(optimizer))

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
        if not self.slim_on_train_end:
            return
        if self.target_reached_step is None:
            warnings.warn(f"ResRep masks never reached flops_target={self.flops_target} (masked FLOPs ratio "
                          f"{self.masked_flops_ratio:.3f} after {self.mask_updates} updates); slimming anyway. "
                          "Train longer or lower warmup/mask_interval.", stacklevel=2)
        self.slim()
        self.save_slimmed_model(self.model, args, state)

    # ------------------------------------------------------------------------------------------------- conversion
    @torch.no_grad()
    def slim(self) -> SlimmingPlan:
        """Folds BatchNorm and compactor into every producer of each target group, drops rows below
        `conversion_threshold` (and masked rows if `drop_masked_rows`) from producers and consumers, checks the eval
        outputs on the example inputs against the unslimmed model, and returns the plan (also `self.plan`). The
        model is left in eval mode. A change above `equivalence_tol * max(1, max |output|)` warns (it means rows
        above the threshold were dropped, or masks came too late to decay)."""
        self._require_prepared()
        model = self.model
        keeps, largest_masked = {}, 0.0
        for name, compactor in self.compactors.items():
            norms = compactor.row_norms()
            if (compactor.mask == 0).any():
                largest_masked = max(largest_masked, float(norms[compactor.mask == 0].max()))
            keep = norms >= self.conversion_threshold
            if self.drop_masked_rows:
                keep &= compactor.mask.bool()
            if not keep.any():
                keep[int(norms.argmax())] = True
            keep_idx = torch.nonzero(keep).flatten()
            width = _round_to(int(keep.sum()), self.multiple, keep.numel())
            if width > keep_idx.numel():  # give rows back (largest norms first) to reach a multiple
                extra = [i for i in torch.argsort(norms, descending=True).tolist() if not keep[i]]
                keep_idx = torch.tensor(sorted(keep_idx.tolist() + extra[: width - keep_idx.numel()]))
            keeps[name] = sorted(keep_idx.tolist())
        model.eval()
        before = model_output(model, self.example_inputs) if self.check_equivalence else None
        for group in self.targets:
            fold_compactor(model, group)
        plan = SlimmingPlan([GroupPlan(g, keeps[g.name]) for g in self.targets], self.multiple, "resrep",
                            getattr(getattr(model, "config", None), "_name_or_path", None) or None,
                            {"flops_target": self.flops_target, "lasso_strength": self.lasso_strength})
        plan.groups = [p for p in plan.groups if p.width < p.group.size] or plan.groups
        apply_plan(model, plan)
        del model.__dict__[_RECORD]
        self.final_flops_ratio = self.flops.ratio(plan.widths)
        plan.metadata.update(flops_ratio=self.final_flops_ratio, largest_masked_row=largest_masked)
        if before is not None:
            self.conversion_error, scale = output_change(before, model_output(model, self.example_inputs))
            plan.metadata["conversion_max_abs_error"] = self.conversion_error
            if self.conversion_error > self.equivalence_tol * max(1.0, scale):
                warnings.warn(f"ResRep slimming changed the outputs by {self.conversion_error:.3g} > "
                              f"{self.equivalence_tol} x max(1, {scale:.3g}) (rows dropped above the threshold, or "
                              "masks set too late to decay; see freeze_masks_after).", stacklevel=2)
        self.plan = plan
        return plan
