"""C-SGD (Centripetal SGD, Ding et al., CVPR 2019) as a `transformers.Trainer` callback.

Every selected channel group (`find_channel_groups`, `CSGDConfig.groups`) is partitioned into clusters; during
training the gradient of every per-channel tensor of the group's producers (kernel, conv/linear bias, BN gamma and
beta) is replaced by `A.G + (eta.I + eps.(I - A)).P` (`update.centripetal_gradient`), which makes the members of a
cluster identical. At the end of training the model is slimmed without loss: one channel per cluster is kept and
every consumer's input slices of the removed members are added onto the kept one (a `SlimmingPlan` with `clusters`).
Residual streams are clustered once for all their producers, from the leading producer (the "pacesetter").

Usage::

    callback = CentripetalSGDCallback(keep_ratio=0.625, centripetal_strength=3e-3)   # or (CSGDConfig(...))
    opt = torch.optim.SGD(csgd_param_groups(model, lr=0.1), lr=0.1, momentum=0.9, nesterov=True)
    Trainer(model, args, callbacks=[callback], optimizers=(opt, None), ...).train()  # slimmed in place at the end
    # the slimmed model and its plan are in <output_dir>/slimmed (save_dir); callback.plan

Weight decay: eta sits inside the edit (kernels: `weight_decay`, default 1e-4; vectors: `vector_weight_decay`,
default 0, as in the official code). So that it is never applied twice, the callback reads the weight decay that
the optimizer's parameter group gives each clustered tensor: `torch.optim.SGD` (coupled decay, added to the
gradient before momentum) gets `(eta - lambda).P` in the edit, so the total is exactly eta whatever
`TrainingArguments.weight_decay` says. Adaptive optimizers are refused (their per-element scaling breaks the
centripetal contraction); with `allow_adaptive_optimizer=True` they are accepted if their decay on clustered
tensors is 0 (a decoupled decay cannot be cancelled inside the gradient).

Deviations from the official code: k-means is our own seeded torch implementation (see `clusters.py`), run on
rank 0 and broadcast; one pruning round per `trainer.train()` (run one training per round for the iterative
schedule); the 2x learning rate of biases is available through `csgd_param_groups`, not imposed; the slimming is
guarded by an output check (tolerance relative to the output scale above 1, since converged members still differ by
~1 ulp) and keeps the smallest index's BN running statistics, as the official trim does.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..flops import round_to
from ..groups import ChannelGroup, find_channel_groups, select_groups
from ..plan import GroupPlan, SlimmingPlan
from ..surgery import apply_plan
from ..trainer import (
    PruningCallback,
    broadcast_from_rank0,
    check_optimizer,
    is_rank0,
    max_output_diff,
    pending_grad_scale,
    refuse_sharding,
)
from .clusters import canonical, clusters_to_labels, form_clusters
from .config import CSGDConfig
from .update import centripetal_gradient, cluster_deviation, max_cluster_gap

logger = logging.getLogger(__name__)

_ADAPTIVE_REASON = ("its per-element step sizes break the centripetal contraction (the cluster members no longer move "
                    "by the same step, so they do not become identical)")


@dataclass
class _Tensor:
    name: str
    param: nn.Parameter
    strength: float
    decay: float
    optimizer_decay: float = 0.0


@dataclass
class _Clustered:
    group: ChannelGroup
    clusters: list[list[int]]
    labels: torch.Tensor
    tensors: list[_Tensor] = field(default_factory=list)
    buffers: list[tuple[str, torch.Tensor]] = field(default_factory=list)


class CentripetalSGDCallback(PruningCallback):
    """Centripetal SGD as a `transformers.Trainer` callback.

    At train begin it clusters the channels of every selected group; before every optimizer step it edits the
    gradients so that each cluster's members become identical; at train end it slims the model in place (one channel
    per cluster, losslessly) after an equivalence check, and saves it with its plan (`save_dir`).

    Args:
        config (CSGDConfig | None): The options; or give its fields as keyword arguments instead.
        check_inputs (optional): The batch of the equivalence check (a dict of model inputs or a tensor; default: the
            first training batch).
        **kwargs: [`CSGDConfig`] fields, when no config is given.

    Raises:
        ValueError: Bad options (from [`CSGDConfig`]), an FSDP/DeepSpeed run, or an adaptive optimizer without
            `allow_adaptive_optimizer=True`.

    Example:
        ```python
        from peft_effadapt import CentripetalSGDCallback, widths_for_flops
        from peft_effadapt.testing import load_tiny_resnet, tiny_pixel_values

        model, _ = load_tiny_resnet()
        callback = CentripetalSGDCallback(keep_ratio=widths_for_flops(model, tiny_pixel_values(1, 32), 0.5))
        # Trainer(model, args, train_dataset=..., callbacks=[callback]).train() then slims the model
        ```
    """

    method = "C-SGD"
    config_class = CSGDConfig
    _state_attributes = ("clusters", "deviation_history")

    def __init__(self, config: CSGDConfig | None = None, *, check_inputs=None, **kwargs):
        super().__init__(config, **kwargs)
        self.check_inputs = check_inputs
        self.clusters: dict[str, list[list[int]]] | None = None  # group name -> clusters (restored on resume)
        self.deviation_history: list[tuple[int, float]] = []
        self.plan: SlimmingPlan | None = None
        self.slim_report: dict | None = None
        self._entries: list[_Clustered] = []
        self._model: nn.Module | None = None
        self.multiple: int | None = None  # round_to resolved on the model's device by prepare

    # ----------------------------------------------------------------------------------------------- set-up
    @classmethod
    def squeeze_to(cls, reference: nn.Module, **kwargs) -> CentripetalSGDCallback:
        """"Train wide, squeeze to the original width": target every group of the (wider) trained model at the
        width of the same-named group of `reference` (e.g. the original-width model), so the slimmed model loads
        into `reference`'s architecture."""
        widths = {g.name: int(g.size) for g in find_channel_groups(reference)}
        return cls(keep_ratio=widths, **kwargs)

    def _target_width(self, group: ChannelGroup) -> int | None:
        size = int(group.size)
        if isinstance(self.keep_ratio, dict):
            value = next((v for p, v in self.keep_ratio.items() if fnmatch.fnmatchcase(group.name, p)), None)
            if value is None:
                return None
        else:
            value = self.keep_ratio
        if isinstance(value, int):
            if value > size:
                raise ValueError(f"group {group.name!r} has {size} channels; cannot keep {value} clusters of them")
            width = value
        else:
            width = round_to(max(1, math.ceil(value * size)), self.multiple, size)
        return width if width < size else None

    def _select_groups(self, model: nn.Module) -> list[ChannelGroup]:
        found = find_channel_groups(model)
        groups = select_groups(found, self.config.groups)
        if isinstance(self.keep_ratio, dict):
            names = [g.name for g in groups]
            unused = [p for p in self.keep_ratio if not any(fnmatch.fnmatchcase(n, p) for n in names)]
            if unused:
                raise ValueError(f"keep_ratio patterns {unused} match no selected channel group "
                                 f"(groups={self.config.groups!r}); selected groups are {names}")
        return groups

    def prepare(self, model: nn.Module) -> dict[str, list[list[int]]]:
        """Forms (or reuses restored) clusters for every selected group that shrinks and collects the tensors to
        edit; returns the clusters. Called by `on_train_begin`; call it yourself in a custom loop, then
        `edit_gradients()` before every optimizer step and `slim()` at the end."""
        refuse_sharding(self.method, model)
        self.multiple = self.config.multiple(model)  # round_to="auto": the device the model trains on
        groups = self._select_groups(model)
        targets = {g.name: self._target_width(g) for g in groups}
        if all(w is None for w in targets.values()):
            raise ValueError(f"nothing to prune: keep_ratio={self.keep_ratio!r} keeps every channel of the "
                             f"{len(groups)} selected groups of {type(model).__name__}")
        if self.clusters is None:
            clusters = {}
            for g in groups:
                if targets[g.name] is None or not is_rank0():  # only rank 0 clusters; the others receive its result
                    continue
                # k-means on the pacesetter only (HF ResNet: the stage projection, or the stem conv for a stage
                # without one); the other producers of a residual stream follow its clusters
                weight = model.get_submodule(g.pacesetter).weight
                clusters[g.name] = form_clusters(weight.detach(), targets[g.name], self.cluster_method,
                                                 self.kmeans_seed, self.kmeans_n_init)
            self.clusters = broadcast_from_rank0(clusters)
        by_name = {g.name: g for g in groups}
        missing = [n for n in self.clusters if n not in by_name]
        if missing:
            raise ValueError(f"restored clusters name groups {missing} that this model's selection does not have")
        # model order, not the dict's: a Trainer checkpoint stores the clusters with sorted keys, and a resumed run
        # must write the same slimming plan as an uninterrupted one
        self._entries = [self._collect(model, g, canonical(self.clusters[g.name], int(g.size)))
                         for g in groups if g.name in self.clusters]
        self._model = model
        self.build_plan()  # validates widths against round_to now rather than at the end of training
        return self.clusters

    def _collect(self, model: nn.Module, group: ChannelGroup, clusters: list[list[int]]) -> _Clustered:
        entry = _Clustered(group, clusters, clusters_to_labels(clusters, int(group.size)))
        eps, vec_eps = self.centripetal_strength, self.centripetal_strength * self.vector_strength_ratio
        producers = [p for p, _ in group.producers]
        for path in producers + list(group.norms):
            module = model.get_submodule(path)
            is_norm = path not in producers
            for pname, p in module.named_parameters(recurse=False):
                if pname not in ("weight", "bias") or p is None:
                    continue
                if p.shape[0] != group.size:
                    raise ValueError(f"{path}.{pname} has {p.shape[0]} rows but group {group.name!r} has "
                                     f"{group.size} channels")
                if not p.requires_grad:
                    raise ValueError(f"{path}.{pname} is frozen, so its cluster members can never become identical; "
                                     f"unfreeze it or leave group {group.name!r} out of keep_ratio")
                kernel = pname == "weight" and not is_norm
                entry.tensors.append(_Tensor(f"{path}.{pname}", p, eps if kernel else vec_eps,
                                             self.weight_decay if kernel else self.vector_weight_decay))
            if is_norm:
                entry.buffers += [(f"{path}.{b}", getattr(module, b)) for b in ("running_mean", "running_var")
                                  if getattr(module, b, None) is not None]
        for fqn in group.channel_params:  # per-channel scales (layer scale): pulled like the other vectors
            value = model.get_parameter(fqn) if fqn in dict(model.named_parameters()) else model.get_buffer(fqn)
            if value.dim() != 1:
                raise ValueError(f"{fqn} has shape {tuple(value.shape)}; C-SGD clusters 1-D per-channel tensors only")
            if isinstance(value, nn.Parameter) and value.requires_grad:
                entry.tensors.append(_Tensor(fqn, value, vec_eps, self.vector_weight_decay))
            else:
                entry.buffers.append((fqn, value))
        return entry

    def check_optimizer(self, optimizer) -> None:
        """Refuses optimizers that break C-SGD (shared rule: adaptive ones unless `allow_adaptive_optimizer`) and
        records each clustered tensor's coupled decay to cancel it."""
        if optimizer is None:
            return
        params = {t.name: t.param for e in self._entries for t in e.tensors}
        group_of, sgd = check_optimizer(
            optimizer, params, self.method, allow_adaptive=self.allow_adaptive_optimizer, reason=_ADAPTIVE_REASON,
            fix="use torch.optim.SGD(csgd_param_groups(model, lr), lr, momentum=0.9, nesterov=True) or "
                "TrainingArguments(optim='sgd', optim_args='momentum=0.9,nesterov=True')")
        for entry in self._entries:
            for t in entry.tensors:
                decay = float(group_of[id(t.param)].get("weight_decay", 0.0) or 0.0)
                if decay and not sgd:
                    raise ValueError(f"{type(optimizer).__name__} applies weight decay {decay} to clustered "
                                     f"parameter {t.name}; C-SGD applies decay inside the centripetal edit, so set "
                                     "the optimizer's decay of clustered parameters to 0 (e.g. weight_decay=0.0)")
                t.optimizer_decay = decay if sgd else 0.0

    # ----------------------------------------------------------------------------------------------- training
    @torch.no_grad()
    def edit_gradients(self, optimizer=None) -> None:
        """Replaces every clustered tensor's gradient by the centripetal gradient (call after backward/all-reduce
        and clipping, before `optimizer.step()`); the pull is multiplied by a pending fp16 loss scale."""
        scale = pending_grad_scale(optimizer)
        for entry in self._entries:
            for t in entry.tensors:
                if t.param.grad is None:
                    t.param.grad = torch.zeros_like(t.param)  # still pulled to the centre
                t.param.grad.copy_(centripetal_gradient(t.param, t.param.grad, entry.labels, t.strength,
                                                        t.decay - t.optimizer_decay, scale))

    def deviation(self) -> float:
        """sum over clustered tensors and clusters of ||p_i - cluster mean||^2 (0 when all clusters are identical)."""
        return sum(cluster_deviation(t.param, e.labels) for e in self._entries for t in e.tensors)

    def max_gap(self, include_buffers: bool = True) -> float:
        """Largest elementwise distance of a member from its cluster mean (parameters and BN running stats)."""
        gaps = [max_cluster_gap(t.param, e.labels) for e in self._entries for t in e.tensors]
        if include_buffers:
            gaps += [max_cluster_gap(b, e.labels) for e in self._entries for _, b in e.buffers]
        return max(gaps, default=0.0)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        super().on_train_begin(args, state, control, model=model, optimizer=optimizer, **kwargs)
        if self.clusters is None and getattr(state, "global_step", 0) > 0:
            raise ValueError("resuming C-SGD from a checkpoint needs the clusters it was trained with (re-clustering "
                             "the half-converged weights would start over), and this checkpoint's trainer state has "
                             "none for CentripetalSGDCallback")
        self.prepare(model)
        self.check_optimizer(optimizer)
        if getattr(args, "max_grad_norm", 0) and args.max_grad_norm > 0:
            logger.info("C-SGD: gradients are clipped before the centripetal edit (the originals used no "
                        "clipping; max_grad_norm=0 reproduces them)")

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.edit_gradients(optimizer)

    def on_step_end(self, args, state, control, **kwargs):
        every = getattr(args, "logging_steps", 0) or 0
        if 0 < every < 1:  # Trainer convention: a fraction of the total steps
            every = math.ceil(every * (getattr(state, "max_steps", 0) or 1))
        if every and state.global_step % int(every) == 0:
            self.deviation_history.append((state.global_step, self.deviation()))
            logger.info("C-SGD step %d: cluster deviation %.3e", *self.deviation_history[-1])

    def on_train_end(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if not self.slim_on_train_end:
            return
        inputs = self.check_inputs
        if inputs is None and self.check_equivalence and train_dataloader is not None:
            inputs = next(iter(train_dataloader))
        self.slim(model, inputs)
        self.save_slimmed_model(model, args, state)

    # ----------------------------------------------------------------------------------------------- slimming
    def build_plan(self) -> SlimmingPlan:
        """The `SlimmingPlan` of the slimming: keep the smallest index of every cluster; consumers sum the members."""
        if not self._entries:
            raise ValueError("no clusters yet: call prepare(model) (done by on_train_begin) before slimming")
        plan = SlimmingPlan([GroupPlan(e.group, [c[0] for c in e.clusters], e.clusters) for e in self._entries],
                            round_to=self.multiple, method="csgd",
                            metadata={"centripetal_strength": self.centripetal_strength,
                                      "cluster_method": self.cluster_method})
        plan.validate()
        return plan

    def slim(self, model: nn.Module | None = None, inputs=None, check: bool | None = None) -> SlimmingPlan:
        """Slims `model` in place (one channel per cluster; consumers absorb the removed members) and returns the
        plan (also `self.plan`).

        With `check` (default `check_equivalence`) and `inputs` (a dict of model inputs or a tensor), outputs of the
        wide and the slimmed model are compared in eval mode first; above `equivalence_tol * max(1, max |output|)`
        nothing is changed and a `RuntimeError` names the remaining cluster gap.
        """
        model = model if model is not None else self._model
        if model is None:
            raise ValueError("slim needs the model (or a prior prepare(model))")
        if not self._entries or self._model is not model:
            self.prepare(model)
        plan = self.build_plan()
        check = self.check_equivalence if check is None else check
        report = {"max_gap": self.max_gap(), "deviation": self.deviation()}
        if check and inputs is not None:
            wide = copy.deepcopy(model).float().eval()
            slim = copy.deepcopy(wide)
            apply_plan(slim, plan)
            diff, scale = max_output_diff(wide, slim, inputs)
            report.update(max_abs_output_diff=diff, max_abs_output=scale)
            if not diff <= self.equivalence_tol * max(1.0, scale):
                raise RuntimeError(f"C-SGD slimming would change the outputs by {diff:.3e} > equivalence_tol="
                                   f"{self.equivalence_tol:g} x max(1, max |output| = {scale:.3g}): the clusters have "
                                   f"not converged (largest member gap {report['max_gap']:.3e}, incl. BN running "
                                   "stats). The model was left unslimmed; train longer or with a larger "
                                   "centripetal_strength, or call slim(model, check=False) to accept the loss")
        was_training = model.training
        apply_plan(model, plan)
        model.train(was_training)
        self.plan, self.slim_report = plan, report
        self._entries, self._model = [], None
        return plan
