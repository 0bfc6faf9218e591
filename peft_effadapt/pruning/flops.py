"""FLOPs of a model and of its slimmed variants.

Convention (one for the whole package): FLOPs as counted by `torch.utils.flop_counter.FlopCounterMode` for one forward
pass of the example inputs — 2 per multiply-accumulate of every conv, linear and matmul; BatchNorm, activations and
pooling are not counted. `FlopsModel` measures the model once and then predicts the count for any width vector
exactly (the conv/linear terms are bilinear in their input and output widths; everything else is constant), so a
greedy pruner can query it thousands of times.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .groups import ChannelGroup

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def round_to(width: int, multiple: int | None, maximum: int | None = None) -> int:
    """`width` rounded *up* to a multiple of `multiple` (kernels like multiples of 8/16), at least `multiple` and never
    above `maximum` (the original width, which is kept as is)."""
    rounded = width if not multiple or multiple <= 1 else max(multiple, math.ceil(width / multiple) * multiple)
    return min(rounded, maximum) if maximum is not None else rounded


_round_up = round_to  # for functions whose `round_to` argument shadows the helper

AUTO = "auto"
CUDA_MULTIPLE = 8
CPU_MULTIPLE = 16  # measured: benchmarks/pruning.py alignment (results/pruning_alignment_cpu_1thread.json)


def aligned_multiple(device: str | torch.device) -> int:
    """The width multiple `round_to="auto"` picks for `device`: 8 on CUDA (fp16/bf16 tensor-core GEMMs and cuDNN
    convolutions want channel counts in multiples of 8; TF32 wants 4, which 8 also meets), 16 on CPU (the fastest of
    1/4/8/16 for a ResNet-50 at 0.5 FLOPs, measured with oneDNN), 1 elsewhere.

    Args:
        device: where the slimmed model will run (`"cuda"`, `"cuda:1"`, `"cpu"`, a `torch.device`).

    Returns:
        The multiple (1: any width).

    Raises:
        ValueError: `device` is not a device name.
    """
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise ValueError(f"aligned_multiple: {device!r} is not a torch device (e.g. 'cuda', 'cpu').") from None
    return {"cuda": CUDA_MULTIPLE, "cpu": CPU_MULTIPLE}.get(kind, 1)


def check_round_to(value, what: str = "round_to") -> None:
    """Raises `ValueError` unless `value` is None, a positive int or "auto"."""
    if value is None or value == AUTO:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive int, 'auto' or None, got {value!r}.")


def width_multiple(round_to: int | str | None, model: nn.Module | None = None,
                   device: str | torch.device | None = None) -> int | None:
    """The multiple that `round_to` asks for (None when widths are free): an int as given, or for `"auto"`
    `aligned_multiple` of `device` (default: the device of `model`'s parameters, CPU without any).

    Raises:
        ValueError: `round_to` is not a positive int, "auto" or None.
    """
    check_round_to(round_to)
    if round_to == AUTO:
        if device is None:
            param = next(iter(model.parameters()), None) if model is not None else None
            device = param.device if param is not None else "cpu"
        round_to = aligned_multiple(device)
    return round_to if round_to and round_to > 1 else None


def _call(model: nn.Module, example_inputs):
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def count_flops(model: nn.Module, example_inputs) -> int:
    """FLOPs of one forward pass (eval mode, no grad; the training flag is restored) of `model` on `example_inputs`
    (a tensor, a tuple of positional inputs or a dict of keyword inputs), counted by `FlopCounterMode`."""
    counter = FlopCounterMode(display=False)
    training = model.training
    model.eval()
    try:
        with torch.no_grad(), counter:
            _call(model, example_inputs)
    finally:
        model.train(training)
    return int(counter.get_total_flops())


@dataclass
class _Term:
    coeff: int          # FLOPs per (input channel x output channel)
    in_group: str | None
    in_mult: int        # input features per group channel (flatten block size; 1 for convs)
    in_fixed: int       # used when in_group is None
    out_group: str | None
    out_fixed: int


@dataclass
class RecordOutput:
    """Forward hook of one conv/linear while the FLOPs are measured: appends (path, module, output) to `records`."""

    path: str
    records: list

    def __call__(self, module: nn.Module, args, output) -> None:
        self.records.append((self.path, module, output))


class FlopsModel:
    """Exact FLOPs of `model` as a function of group widths, from one measured forward pass.

    Use `FlopsModel.measure(model, example_inputs, groups)`; `flops(widths)` takes `{group name: width}` (missing
    groups keep their full size); `baseline` is the measured count of the unpruned model."""

    def __init__(self, baseline: int, terms: list[_Term], sizes: dict[str, int]):
        self.baseline = baseline
        self.terms = terms
        self.sizes = dict(sizes)
        self.constant = baseline - self._variable({})
        self._by_group: dict[str, list[_Term]] = {}
        for term in terms:
            for name in {term.in_group, term.out_group} - {None}:
                self._by_group.setdefault(name, []).append(term)

    @classmethod
    def measure(cls, model: nn.Module, example_inputs, groups: Sequence[ChannelGroup]) -> FlopsModel:
        out_of, in_of = {}, {}
        for group in groups:
            for path, kind in group.producers:
                out_of[path] = group
                if kind == "depthwise":
                    in_of[path] = None  # cost of a depthwise conv is linear in its width
            for path in group.consumers:
                in_of[path] = group
        records: list[tuple[str, nn.Module, torch.Tensor]] = []
        handles = [module.register_forward_hook(RecordOutput(path, records))
                   for path, module in model.named_modules() if isinstance(module, (*_CONVS, nn.Linear))]
        try:
            baseline = count_flops(model, example_inputs)
        finally:
            for handle in handles:
                handle.remove()
        terms = []
        for path, module, out in records:
            if isinstance(module, nn.Linear):
                coeff, in_dim, out_dim = 2 * (out.numel() // module.out_features), module.in_features, \
                    module.out_features
            else:
                kernel = math.prod(module.kernel_size)
                coeff = 2 * out.shape[0] * math.prod(out.shape[2:]) * kernel
                in_dim, out_dim = module.in_channels // module.groups, module.out_channels
            in_group = in_of.get(path)
            out_group = out_of.get(path)
            mult = in_dim // in_group.size if in_group is not None else 1
            terms.append(_Term(coeff, in_group.name if in_group else None, mult, in_dim,
                               out_group.name if out_group else None, out_dim))
        return cls(baseline, terms, {g.name: g.size for g in groups})

    def _variable(self, widths: Mapping[str, int], terms=None) -> int:
        total = 0
        for t in self.terms if terms is None else terms:
            cin = t.in_mult * widths.get(t.in_group, self.sizes[t.in_group]) if t.in_group else t.in_fixed
            cout = widths.get(t.out_group, self.sizes[t.out_group]) if t.out_group else t.out_fixed
            total += t.coeff * cin * cout
        return total

    def flops(self, widths: Mapping[str, int]) -> int:
        """Predicted FLOPs with the given widths (same convention and inputs as the measurement)."""
        unknown = set(widths) - set(self.sizes)
        if unknown:
            raise ValueError(f"Unknown channel groups {sorted(unknown)}; known: {sorted(self.sizes)}.")
        return self.constant + self._variable(widths)

    def ratio(self, widths: Mapping[str, int]) -> float:
        return self.flops(widths) / self.baseline

    def group_cost(self, widths: Mapping[str, int], name: str) -> int:
        """FLOPs of the terms that depend on group `name` at the given widths."""
        return self._variable(widths, self._by_group.get(name, []))

    def saving(self, widths: Mapping[str, int], name: str) -> int:
        """FLOPs removed by taking one more channel out of group `name` at the current `widths`."""
        terms = self._by_group.get(name, [])
        fewer = {**widths, name: widths.get(name, self.sizes[name]) - 1}
        return self._variable(widths, terms) - self._variable(fewer, terms)


def widths_for_flops(model: nn.Module, example_inputs, flops_ratio: float, groups="all", *,
                     round_to: int | str | None = None, device: str | torch.device | None = None) -> dict[str, int]:
    """Per-group widths that bring the model to a FLOPs target with one uniform keep ratio.

    The largest ratio whose FLOPs (counted with `torch.utils.flop_counter`, 2 per MAC) are at most `flops_ratio` of the
    model's, over the groups chosen by `groups`. Usable as C-SGD's `keep_ratio` or with `plan_from_widths`. Rounding
    happens inside the search: every width is rounded up to the multiple first, and the ratio is the largest whose
    *rounded* widths fit, so the budget holds (rounding lowers the ratio, never raises the FLOPs above `flops_ratio`).

    Args:
        model (nn.Module): The unslimmed model.
        example_inputs: One batch (a tensor, a tuple of positional inputs or a dict of keyword inputs) to count FLOPs.
        flops_ratio (float): Target fraction of the model's FLOPs, in (0, 1].
        groups: A family ("internal", "streams", "all"), glob patterns, or `ChannelGroup`s (see `select_groups`).
        round_to (int | str | None): Keep every width a multiple of this int (or the full width); `"auto"`:
            `aligned_multiple(device)` (8 on CUDA, 16 on CPU); None: any width.
        device: Where the slimmed model will run, for `round_to="auto"` (default: the device of `model`).

    Returns:
        dict[str, int]: `{group name: width}`; groups left at full width are omitted.

    Raises:
        ValueError: `flops_ratio` outside (0, 1], a bad `round_to`, or a target that one channel per group (rounded)
            cannot reach.
    """
    from .groups import find_channel_groups, select_groups

    if isinstance(flops_ratio, bool) or not isinstance(flops_ratio, (int, float)) or not 0 < flops_ratio <= 1:
        raise ValueError(f"flops_ratio must be in (0, 1], got {flops_ratio!r}")
    multiple = width_multiple(round_to, model, device)
    found = find_channel_groups(model, example_inputs)
    chosen = select_groups(found, groups)
    flops = FlopsModel.measure(model, example_inputs, found if isinstance(groups, str) or
                               not isinstance(groups[0], ChannelGroup) else chosen)

    def widths(r: float) -> dict[str, int]:
        return {g.name: _round_up(max(1, math.ceil(r * g.size)), multiple, g.size) for g in chosen}

    if flops.ratio(widths(0.0)) > flops_ratio:
        raise ValueError(f"FLOPs target {flops_ratio} is unreachable with groups={groups!r}: one channel per group "
                         f"(rounded to {multiple or 1}) leaves {flops.ratio(widths(0.0)):.3f} of the FLOPs")
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if flops.ratio(widths(mid)) <= flops_ratio else (lo, mid)
    sizes = {g.name: g.size for g in chosen}
    return {k: v for k, v in widths(lo).items() if v < sizes[k]}

