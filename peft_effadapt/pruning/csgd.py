"""C-SGD (Centripetal SGD, Ding et al., CVPR 2019) as a `transformers.Trainer` callback.

Every prunable channel group (`find_channel_groups`) is partitioned into clusters; during training the gradient of
every per-channel tensor of the group's producers (kernel, conv/linear bias, BN gamma and beta) is replaced by
`A.G + (eta.I + eps.(I - A)).P` (`csgd_update.centripetal_gradient`), which makes the members of a cluster
identical. At the end of training the model is trimmed without loss: one channel per cluster is kept and every
consumer's input slices of the removed members are added onto the kept one (a `SlimmingPlan` with `clusters`).
Method notes: docs/csgd.md.

Usage::

    callback = CentripetalSGDCallback(keep_ratio=0.625, centripetal_strength=3e-3)
    args = TrainingArguments(..., optim="sgd", optim_args="momentum=0.9,nesterov=True", max_grad_norm=0)
    Trainer(model, args, callbacks=[callback], ...).train()   # model is slimmed in place at train end
    save_slimmed(model, callback.plan, "out/")               # or CentripetalSGDCallback(save_dir="out/")

Weight decay: eta sits inside the edit (kernels: `weight_decay`, default 1e-4; vectors: `vector_weight_decay`,
default 0, as in the official code). So that it is never applied twice, the callback reads the weight decay that
the optimizer's parameter group gives each clustered tensor: a coupled-decay optimizer (`torch.optim.SGD`, which
adds lambda.P to the gradient before momentum) gets `(eta - lambda).P` in the edit, so the total is exactly eta
whatever `TrainingArguments.weight_decay` says; a decoupled-decay optimizer (AdamW) with lambda != 0 on a clustered
tensor is refused, because its decay cannot be cancelled inside the gradient.

Deviations from the official code: k-means is our own seeded torch implementation (see `clusters.py`), run on
rank 0 and broadcast; one pruning round per `trainer.train()` (run one training per round for the iterative
schedule); the 2x learning rate of biases is available through `csgd_optimizer`, not imposed; the trim is guarded by
an output check (tolerance relative to the logit scale above 1, since converged members still differ by ~1 ulp) and
keeps the smallest index's BN running statistics, as the official trim does. Resuming needs
`TrainingArguments(restore_callback_states_from_checkpoint=True)`: the clusters are Trainer callback state.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .clusters import CLUSTER_METHODS, canonical, clusters_to_labels, form_clusters
from .csgd_runtime import (
    broadcast_from_rank0,
    check_not_sharded,
    inner_optimizer,
    is_rank0,
    max_output_diff,
    pending_grad_scale,
)
from .csgd_update import centripetal_gradient, cluster_deviation, max_cluster_gap
from .flops import FlopsModel, round_to
from .groups import ChannelGroup, find_channel_groups
from .plan import GroupPlan, SlimmingPlan, save_slimmed
from .surgery import apply_plan

logger = logging.getLogger(__name__)


@dataclass
class _Tensor:
    name: str
    param: nn.Parameter
    strength: float
    decay: float
    optimizer_decay: float = 0.0


@dataclass
class _Clustered:
    group: object  # ChannelGroup
    clusters: list[list[int]]
    labels: torch.Tensor
    tensors: list[_Tensor] = field(default_factory=list)
    buffers: list[tuple[str, torch.Tensor]] = field(default_factory=list)


class CentripetalSGDCallback(TrainerCallback, ExportableState):
    """Centripetal SGD: cluster channels, make each cluster identical while training, trim losslessly at the end.

    Args:
        keep_ratio: kept channels per group: a float in (0, 1] for every group, or a dict `{glob on group name:
            float ratio | int width}` (groups that no pattern matches are left alone). 5/8 is the paper's CIFAR setting.
        groups: "auto" (`find_channel_groups(model)`) or a list of `ChannelGroup`.
        prune_residual_groups: also cluster residual-stream groups (several producers share one clustering, computed
            from the leading producer, the "pacesetter"). False = internal layers only (the ImageNet setting).
        prune_mlp: also cluster transformer MLP neurons (fc1 rows / fc2 columns).
        centripetal_strength: eps, in the code's lr-scaled convention (CIFAR 3e-3, ImageNet ResNet-50 0.05).
        vector_strength_ratio: eps multiplier for conv/linear biases and BN gamma/beta (0.1).
        weight_decay: eta for kernels inside the edit (1e-4); vector_weight_decay: eta for vectors (0).
        cluster_method: "kmeans" (on the pacesetter's kernel rows), "even" or "biased".
        kmeans_seed, kmeans_n_init: seed and restarts of k-means (computed on rank 0, broadcast to all ranks).
        round_to: round every target width up to a multiple of this (kernel-friendly widths), capped at the width.
        trim_on_train_end: slim the model in place when training ends (after the equivalence check).
        check_equivalence, equivalence_tol: compare logits of the wide and the trimmed model in eval mode on
            `check_inputs` (default: the first training batch); refuse to trim when the largest change exceeds
            `equivalence_tol * max(1, max |logit|)` (relative above 1: converged members still differ by float32
            rounding, ~1 ulp, which larger logits amplify).
        save_dir: if set, the main process writes the slimmed model and its plan there (`save_slimmed`).
        allow_adaptive_optimizer: C-SGD's convergence argument needs SGD(+momentum); set True to accept
            Adam-type optimizers anyway (their decay on clustered tensors must then be 0).
    """

    def __init__(self, keep_ratio: float | dict = 0.625, groups="auto", prune_residual_groups: bool = True,
                 prune_mlp: bool = True, centripetal_strength: float = 3e-3, vector_strength_ratio: float = 0.1,
                 weight_decay: float = 1e-4, vector_weight_decay: float = 0.0, cluster_method: str = "kmeans",
                 kmeans_seed: int = 0, kmeans_n_init: int = 10, round_to: int = 1, trim_on_train_end: bool = True,
                 check_equivalence: bool = True, equivalence_tol: float = 1e-5, check_inputs: dict | None = None,
                 save_dir: str | None = None, allow_adaptive_optimizer: bool = False):
        if isinstance(keep_ratio, dict):
            for pattern, value in keep_ratio.items():
                self._check_keep(value, f"keep_ratio[{pattern!r}]")
        else:
            self._check_keep(keep_ratio, "keep_ratio")
            if isinstance(keep_ratio, int):
                raise ValueError("a single keep_ratio must be a float in (0, 1]; give absolute widths per group as a "
                                 "dict {group name pattern: width}")
        if cluster_method not in CLUSTER_METHODS:
            raise ValueError(f"cluster_method must be one of {CLUSTER_METHODS}, got {cluster_method!r}")
        for name, value in (("centripetal_strength", centripetal_strength), ("weight_decay", weight_decay),
                            ("vector_strength_ratio", vector_strength_ratio),
                            ("vector_weight_decay", vector_weight_decay), ("equivalence_tol", equivalence_tol)):
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a non-negative number, got {value!r}")
        if not isinstance(round_to, int) or round_to < 1:
            raise ValueError(f"round_to must be a positive int, got {round_to!r}")
        if groups != "auto" and not isinstance(groups, (list, tuple)):
            raise ValueError(f"groups must be 'auto' or a list of ChannelGroup, got {type(groups).__name__}")
        if groups != "auto":  # dicts: ChannelGroup.to_dict() form, as stored in a Trainer checkpoint
            groups = [ChannelGroup.from_dict(g) if isinstance(g, dict) else g for g in groups]
        self.keep_ratio, self.groups = keep_ratio, groups
        self.prune_residual_groups, self.prune_mlp = prune_residual_groups, prune_mlp
        self.centripetal_strength, self.vector_strength_ratio = float(centripetal_strength), float(vector_strength_ratio)
        self.weight_decay, self.vector_weight_decay = float(weight_decay), float(vector_weight_decay)
        self.cluster_method, self.kmeans_seed, self.kmeans_n_init = cluster_method, kmeans_seed, kmeans_n_init
        self.round_to, self.trim_on_train_end = round_to, trim_on_train_end
        self.check_equivalence, self.equivalence_tol = check_equivalence, float(equivalence_tol)
        self.check_inputs, self.save_dir = check_inputs, save_dir
        self.allow_adaptive_optimizer = allow_adaptive_optimizer
        self.clusters: dict[str, list[list[int]]] | None = None  # group name -> clusters (restored on resume)
        self.deviation_history: list[tuple[int, float]] = []
        self.plan = None
        self.trim_report: dict | None = None
        self._entries: list[_Clustered] = []
        self._model: nn.Module | None = None

    @staticmethod
    def _check_keep(value, what: str) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{what} must be a float ratio in (0, 1] or an int width, got {value!r}")
        if isinstance(value, float) and not 0 < value <= 1:
            raise ValueError(f"{what} must be in (0, 1], got {value}")
        if isinstance(value, int) and value < 1:
            raise ValueError(f"{what} must be a positive width, got {value}")

    # ----------------------------------------------------------------------------------------------- set-up
    @classmethod
    def squeeze_to(cls, reference: nn.Module, **kwargs) -> CentripetalSGDCallback:
        """"Train wide, squeeze to the original width": target every group of the (wider) trained model at the
        width of the same-named group of `reference` (e.g. the original-width model), so the trimmed model loads
        into `reference`'s architecture."""
        widths = {g.name: int(g.size) for g in find_channel_groups(reference)}
        if not widths:
            raise ValueError(f"{type(reference).__name__} has no channel groups to take target widths from")
        return cls(keep_ratio=widths, **kwargs)

    def _target_width(self, group) -> int | None:
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
            width = round_to(max(1, math.ceil(value * size)), self.round_to, size)
        return width if width < size else None

    def _select_groups(self, model: nn.Module) -> list:
        groups = list(find_channel_groups(model)) if self.groups == "auto" else list(self.groups)
        if isinstance(self.keep_ratio, dict):
            names = [g.name for g in groups]
            unused = [p for p in self.keep_ratio if not any(fnmatch.fnmatchcase(n, p) for n in names)]
            if unused:
                raise ValueError(f"keep_ratio patterns {unused} match no channel group; groups are {names}")
        return eligible_groups(model, groups, self.prune_residual_groups, self.prune_mlp)

    def setup(self, model: nn.Module) -> dict[str, list[list[int]]]:
        """Form (or reuse restored) clusters for every group that shrinks, and collect the tensors to edit.

        Called by `on_train_begin`; call it yourself in a custom loop, then `edit_gradients()` before every step.
        """
        check_not_sharded(model)
        groups = self._select_groups(model)
        targets = {g.name: self._target_width(g) for g in groups}
        if all(w is None for w in targets.values()):
            raise ValueError(f"nothing to prune: keep_ratio={self.keep_ratio!r} keeps every channel of the "
                             f"{len(groups)} eligible groups of {type(model).__name__}")
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
            raise ValueError(f"restored clusters name groups {missing} that this model does not have")
        # model order, not the dict's: a Trainer checkpoint stores the clusters with sorted keys, and a resumed run
        # must write the same slimming plan as an uninterrupted one (found by tests/test_faults.py)
        self._entries = [self._collect(model, g, canonical(self.clusters[g.name], int(g.size)))
                         for g in groups if g.name in self.clusters]
        self._model = model
        self.build_plan()  # validates widths against round_to now rather than at the end of training
        return self.clusters

    def _collect(self, model: nn.Module, group, clusters: list[list[int]]) -> _Clustered:
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
        return entry

    def check_optimizer(self, optimizer) -> None:
        """Refuse optimizers that break C-SGD, and record each clustered tensor's coupled decay to cancel it."""
        inner = inner_optimizer(optimizer)
        if inner is None:
            return
        group_of = {id(p): g for g in inner.param_groups for p in g["params"]}
        sgd = isinstance(inner, torch.optim.SGD)
        if not sgd and not self.allow_adaptive_optimizer:
            raise ValueError(f"C-SGD needs torch.optim.SGD (momentum 0.9, Nesterov in the paper); got "
                             f"{type(inner).__name__}, whose per-element scaling breaks the centripetal contraction. "
                             f"Use TrainingArguments(optim='sgd', optim_args='momentum=0.9,nesterov=True'), "
                             f"`csgd_optimizer(model, lr)`, or allow_adaptive_optimizer=True to accept it anyway")
        for entry in self._entries:
            for t in entry.tensors:
                g = group_of.get(id(t.param))
                if g is None:
                    raise ValueError(f"clustered parameter {t.name} is not in the optimizer, so it cannot converge")
                decay = float(g.get("weight_decay", 0.0) or 0.0)
                if decay and not sgd:
                    raise ValueError(f"{type(inner).__name__} applies weight decay {decay} to clustered parameter "
                                     f"{t.name}; C-SGD applies decay inside the centripetal edit, so set the "
                                     f"optimizer's decay of clustered parameters to 0 (e.g. weight_decay=0.0)")
                t.optimizer_decay = decay if sgd else 0.0

    # ----------------------------------------------------------------------------------------------- training
    @torch.no_grad()
    def edit_gradients(self, optimizer=None) -> None:
        """Replace every clustered tensor's gradient by the centripetal gradient (call after backward/all-reduce
        and clipping, before `optimizer.step()`)."""
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
        check_not_sharded(model, args)
        if self.clusters is None and getattr(state, "global_step", 0) > 0:
            raise ValueError("resuming C-SGD from a checkpoint needs the clusters it was trained with (re-clustering "
                             "the half-converged weights would start over): set TrainingArguments("
                             "restore_callback_states_from_checkpoint=True) so the Trainer restores them")
        self.setup(model)
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
        if not self.trim_on_train_end:
            return
        inputs = self.check_inputs
        if inputs is None and self.check_equivalence and train_dataloader is not None:
            inputs = next(iter(train_dataloader))
        self.trim(model, inputs)
        if self.save_dir and getattr(args, "should_save", True):
            save_slimmed(model, self.plan, self.save_dir)

    # ----------------------------------------------------------------------------------------------- trim
    def build_plan(self) -> SlimmingPlan:
        """The `SlimmingPlan` of the trim: keep the smallest index of every cluster; consumers sum the members."""
        if not self._entries:
            raise ValueError("no clusters yet: call setup(model) (done by on_train_begin) before trimming")
        plan = SlimmingPlan([GroupPlan(e.group, [c[0] for c in e.clusters], e.clusters) for e in self._entries],
                            round_to=self.round_to if self.round_to > 1 else None, method="csgd",
                            metadata={"centripetal_strength": self.centripetal_strength,
                                      "cluster_method": self.cluster_method})
        plan.validate()
        return plan

    def trim(self, model: nn.Module | None = None, inputs=None, check: bool | None = None):
        """Slim `model` in place (one channel per cluster; consumers absorb the removed members) and return the plan.

        With `check` (default `check_equivalence`) and `inputs` (a dict of model inputs or a tensor), logits of the
        wide and the trimmed model are compared in eval mode first; above `equivalence_tol` nothing is changed and
        a `RuntimeError` names the remaining cluster gap.
        """
        model = model if model is not None else self._model
        if model is None:
            raise ValueError("trim needs the model (or a prior setup(model))")
        if not self._entries or self._model is not model:
            self.setup(model)
        plan = self.build_plan()
        check = self.check_equivalence if check is None else check
        report = {"max_gap": self.max_gap(), "deviation": self.deviation()}
        if check and inputs is not None:
            wide = copy.deepcopy(model).float().eval()
            slim = copy.deepcopy(wide)
            apply_plan(slim, plan)
            diff, scale = max_output_diff(wide, slim, inputs)
            report.update(max_abs_logit_diff=diff, max_abs_logit=scale)
            if not diff <= self.equivalence_tol * max(1.0, scale):
                raise RuntimeError(f"C-SGD trim would change the outputs by {diff:.3e} > equivalence_tol="
                                   f"{self.equivalence_tol:g} x max(1, max |logit| = {scale:.3g}): the clusters have not converged (largest member gap "
                                   f"{report['max_gap']:.3e}, incl. BN running stats). The model was left unslimmed; "
                                   f"train longer or with a larger centripetal_strength, or call "
                                   f"trim(model, check=False) to accept the loss")
        was_training = model.training
        apply_plan(model, plan)
        model.train(was_training)
        self.plan, self.trim_report = plan, report
        self._entries, self._model = [], None
        return plan

    # ----------------------------------------------------------------------------------------------- state
    def state(self) -> dict:
        args = {k: getattr(self, k) for k in (
            "keep_ratio", "prune_residual_groups", "prune_mlp", "centripetal_strength", "vector_strength_ratio",
            "weight_decay", "vector_weight_decay", "cluster_method", "kmeans_seed", "kmeans_n_init", "round_to",
            "trim_on_train_end", "check_equivalence", "equivalence_tol", "save_dir", "allow_adaptive_optimizer")}
        args["groups"] = "auto" if self.groups == "auto" else [g.to_dict() for g in self.groups]
        return {"args": args, "attributes": {"clusters": self.clusters,
                                             "deviation_history": [list(x) for x in self.deviation_history]}}


def eligible_groups(model: nn.Module, groups, prune_residual_groups: bool = True, prune_mlp: bool = True) -> list:
    """The groups C-SGD may shrink: prunable ones, minus residual streams / MLPs when switched off."""
    chosen = [g for g in groups if g.prunable and (prune_residual_groups or not g.residual)
              and (prune_mlp or not all(kind == "linear" for _, kind in g.producers))]
    if not chosen:
        raise ValueError(f"{type(model).__name__} has nothing to prune: no channel group is eligible (found "
                         f"{len(groups)} groups; prune_residual_groups={prune_residual_groups}, prune_mlp={prune_mlp})")
    return chosen


def widths_for_flops(model: nn.Module, example_inputs, flops_ratio: float, groups=None,
                     prune_residual_groups: bool = True, prune_mlp: bool = True, round_to_multiple: int = 1,
                     ) -> dict[str, int]:
    """Per-group widths `{group name: width}` (usable as `keep_ratio`) from one uniform keep ratio, the largest
    whose FLOPs (`FlopsModel`, `count_flops` convention) are at most `flops_ratio` of the model's."""
    if not 0 < flops_ratio <= 1:
        raise ValueError(f"flops_ratio must be in (0, 1], got {flops_ratio}")
    groups = list(find_channel_groups(model)) if groups is None else list(groups)
    chosen = eligible_groups(model, groups, prune_residual_groups, prune_mlp)
    flops = FlopsModel.measure(model, example_inputs, groups)

    def widths(r: float) -> dict[str, int]:
        return {g.name: round_to(max(1, math.ceil(r * g.size)), round_to_multiple, g.size) for g in chosen}

    if flops.ratio(widths(0.0)) > flops_ratio:
        raise ValueError(f"FLOPs target {flops_ratio} is unreachable: even one channel per eligible group "
                         f"(rounded to {round_to_multiple}) leaves {flops.ratio(widths(0.0)):.3f} of the FLOPs")
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if flops.ratio(widths(mid)) <= flops_ratio else (lo, mid)
    return {k: v for k, v in widths(lo).items() if v < next(g.size for g in chosen if g.name == k)}


def csgd_optimizer(model: nn.Module, lr: float, momentum: float = 0.9, nesterov: bool = True,
                   weight_decay: float = 1e-4, bias_lr_factor: float = 2.0) -> torch.optim.SGD:
    """The official optimizer: SGD with Nesterov momentum 0.9, decay 1e-4 on kernels (none on biases and norm
    parameters), biases at `bias_lr_factor` x lr. Pass it as `Trainer(optimizers=(opt, None))`. Clustered tensors'
    decay is taken over by the callback's edit either way (see module docstring)."""
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
    return torch.optim.SGD([g for g in groups if g["params"]], lr=lr, momentum=momentum, nesterov=nesterov)
