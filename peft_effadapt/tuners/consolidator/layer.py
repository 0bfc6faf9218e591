from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .pattern import BranchPattern, support_index


class ConsolidatorBranch(nn.Module):
    """One grouped-connection branch: values ``[Dout, si]`` (row ``o`` holds its ``si`` connections) and a bias."""

    def __init__(self, pattern: BranchPattern, bias: bool, init_range: float):
        super().__init__()
        self.pattern = pattern
        self.weight = nn.Parameter(torch.empty(pattern.out_features, pattern.in_per_group))
        self.bias = nn.Parameter(torch.empty(pattern.out_features)) if bias else None
        for tensor in (self.weight, self.bias):
            if tensor is not None:
                nn.init.uniform_(tensor, -init_range, init_range)
        self.aligned = pattern.is_block_aligned()
        index = pattern.grouped_input_index() if self.aligned else None
        self.input_slice = index if isinstance(index, slice) else None
        self.register_buffer("input_index", index if isinstance(index, torch.Tensor) else None, persistent=False)
        self.register_buffer("columns", None if self.aligned else pattern.columns(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.aligned:  # groups straddle the q/k/v boundary of a fused layer: masked dense delta
            return F.linear(x, self.dense_weight(), self.bias)
        if self.input_slice is not None:
            x = x[..., self.input_slice]
        elif self.input_index is not None:
            x = x.index_select(-1, self.input_index)
        so, si = self.pattern.out_per_group, self.pattern.in_per_group
        groups = self.pattern.out_features // so
        # One small matmul per group, batched: [g, tokens, si] @ [g, si, so]. bmm (unlike einsum's small-size
        # path) is on the autocast lists, so the branch runs in bf16/fp16 under mixed precision.
        tokens = x.reshape(-1, groups, si).transpose(0, 1)
        y = torch.bmm(tokens, self.weight.view(groups, so, si).transpose(1, 2).to(tokens.dtype))
        y = y.transpose(0, 1).reshape(*x.shape[:-1], self.pattern.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def dense_weight(self) -> torch.Tensor:
        return self.pattern.dense(self.weight, self.columns)


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Per-sample DropPath over the first dimension: keep a sample's whole branch output with prob. 1-p, scaled."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


class ConsolidatorLayer(BaseTunerLayer):
    """Mixin holding, per adapter, either trainable branches (training state) or the consolidated delta values."""

    adapter_layer_names = ("consolidator_branches", "consolidator_delta", "consolidator_bias")
    other_param_names = ("consolidator_patterns", "consolidator_rep_drop", "consolidator_support")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.consolidator_branches = nn.ModuleDict({})
        self.consolidator_delta = nn.ParameterDict({})
        self.consolidator_bias = nn.ParameterDict({})
        self.consolidator_patterns: dict[str, list[BranchPattern]] = {}
        self.consolidator_rep_drop: dict[str, float] = {}
        self.consolidator_support: dict[str, torch.Tensor] = {}
        self._merged_deltas: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.kwargs = kwargs

    def update_layer(
        self,
        adapter_name: str,
        patterns: list[BranchPattern],
        rep_drop: float,
        rep_bias: bool,
        train_bias: bool,
        init_range: float,
        inference_mode: bool = False,
    ) -> None:
        self._build(adapter_name, patterns, rep_drop, rep_bias, train_bias, init_range)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _build(self, adapter_name, patterns, rep_drop, rep_bias, train_bias, init_range) -> None:
        # The official parametrisation: every branch has its own bias (dropped with its branch), and the Linear's
        # bias is tuned as well (here as a delta on the frozen bias), so a step moves Δb by one step per vector.
        self.consolidator_patterns[adapter_name] = patterns
        self.consolidator_rep_drop[adapter_name] = rep_drop
        self.consolidator_support[adapter_name] = support_index(patterns)
        self.consolidator_branches[adapter_name] = nn.ModuleList(
            ConsolidatorBranch(pattern, rep_bias, init_range) for pattern in patterns
        )
        if train_bias:
            self.consolidator_bias[adapter_name] = nn.Parameter(torch.zeros(self.out_features))

    def holds_branches(self, adapter_name: str) -> bool:
        """True while the adapter is in the training form (branches), False once consolidated."""
        return adapter_name in self.consolidator_branches

    def adapter_form(self, adapter_name: str) -> dict[str, nn.Module]:
        """The adapter's current tensors (its entries in `adapter_layer_names`), for `put_adapter_form`."""
        return {attr: getattr(self, attr)[adapter_name] for attr in self.adapter_layer_names
                if adapter_name in getattr(self, attr)}

    def put_adapter_form(self, adapter_name: str, form: dict[str, nn.Module]) -> None:
        """Puts back what `adapter_form` returned (the very modules and parameters, so optimizers still hold them)."""
        for attr in self.adapter_layer_names:
            container = getattr(self, attr)
            if adapter_name in container:
                del container[adapter_name]
            if attr in form:
                container[adapter_name] = form[attr]

    def restore_branches(self, adapter_name: str, rep_bias: bool, train_bias: bool) -> None:
        """Turns an adapter in the consolidated state back into zero-initialised branches (same trainability), ready to
        receive branch tensors from a file."""
        if adapter_name not in self.consolidator_delta:
            return
        trainable = self.consolidator_delta[adapter_name].requires_grad
        del self.consolidator_delta[adapter_name]
        if adapter_name in self.consolidator_bias:
            del self.consolidator_bias[adapter_name]
        self._build(adapter_name, self.consolidator_patterns[adapter_name], self.consolidator_rep_drop[adapter_name],
                    rep_bias, train_bias, init_range=0.0)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        for param in self._adapter_parameters(adapter_name):
            param.requires_grad_(trainable)

    def to_consolidated(self, adapter_name: str, with_bias: bool, storage_dtype: torch.dtype | None = None) -> None:
        """Switches an adapter to the consolidated state: ΔW's values on the support and Δb (stage 1).

        ``storage_dtype`` rounds the values to what a file in that dtype holds, so the model computes what it ships.
        The delta keeps training if required (one masked delta over the union of the branches' supports, without
        DropPath, which the consolidated form no longer separates into branches).
        """
        trainable = any(p.requires_grad for p in self._adapter_parameters(adapter_name))
        with torch.no_grad():
            delta, bias = self.consolidated_values(adapter_name)
        if storage_dtype is not None:
            delta = delta.to(storage_dtype).to(delta.dtype)
            bias = None if bias is None else bias.to(storage_dtype).to(bias.dtype)
        if adapter_name in self.consolidator_branches:
            del self.consolidator_branches[adapter_name]
        self.consolidator_delta[adapter_name] = nn.Parameter(delta.detach(), requires_grad=trainable)
        if with_bias:
            bias = delta.new_zeros(self.out_features) if bias is None else bias.detach()
            self.consolidator_bias[adapter_name] = nn.Parameter(bias, requires_grad=trainable)
        elif adapter_name in self.consolidator_bias:
            del self.consolidator_bias[adapter_name]

    def _adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        params = []
        for attr in self.adapter_layer_names:
            container = getattr(self, attr)
            if adapter_name in container:
                item = container[adapter_name]
                params.extend(item.parameters() if isinstance(item, nn.Module) else [item])
        return params

    # -- the consolidated delta -------------------------------------------------------------------------------
    def consolidated_values(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(values of ΔW on the support in row-major order, Δb or None), in eval semantics."""
        delta_w, delta_b = self.delta_weight_and_bias(adapter_name)
        return delta_w.flatten()[self.consolidator_support[adapter_name].to(delta_w.device)], delta_b

    def delta_weight_and_bias(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Dense ΔW ``[Dout, Din]`` and Δb of one adapter (DropPath = identity)."""
        bias = self.consolidator_bias.get(adapter_name, None)
        if adapter_name in self.consolidator_delta:
            values = self.consolidator_delta[adapter_name]
            index = self.consolidator_support[adapter_name].to(values.device)
            flat = values.new_zeros(self.out_features * self.in_features).index_copy(0, index, values)
            return flat.view(self.out_features, self.in_features), bias
        branches = self.consolidator_branches[adapter_name]
        delta_w = sum(branch.dense_weight() for branch in branches)
        branch_biases = [branch.bias for branch in branches if branch.bias is not None]
        if branch_biases:
            bias = sum(branch_biases) if bias is None else bias + sum(branch_biases)
        return delta_w, bias

    # -- merging ----------------------------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self.consolidator_patterns:
                continue
            with torch.no_grad():
                delta_w, delta_b = self.delta_weight_and_bias(name)
                delta_w = delta_w.detach().float()
                delta_b = None if delta_b is None else delta_b.detach().float()
                new_weight = base.weight.data.float() + delta_w.to(base.weight.device)
                new_bias = None
                if delta_b is not None:
                    old_bias = base.bias.data.float() if base.bias is not None else torch.zeros_like(delta_b)
                    new_bias = old_bias + delta_b.to(old_bias.device)
                if safe_merge and not (
                    torch.isfinite(new_weight).all() and (new_bias is None or torch.isfinite(new_bias).all())
                ):
                    raise ValueError(
                        f"NaNs or infs detected while merging Consolidator adapter '{name}'; the adapter is broken "
                        "and was not merged."
                    )
                base.weight.data = new_weight.to(base.weight.dtype)
                if new_bias is not None:
                    if base.bias is None:
                        base.bias = nn.Parameter(new_bias.to(base.weight.dtype), requires_grad=False)
                    else:
                        base.bias.data = new_bias.to(base.bias.dtype)
                self._merged_deltas[name] = (delta_w, delta_b)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            delta_w, delta_b = self._merged_deltas.pop(name)
            with torch.no_grad():
                base.weight.data = (base.weight.data.float() - delta_w.to(base.weight.device)).to(base.weight.dtype)
                if delta_b is not None:
                    base.bias.data = (base.bias.data.float() - delta_b.to(base.bias.device)).to(base.bias.dtype)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        return self.delta_weight_and_bias(adapter_name)[0]


class ConsolidatorLinear(nn.Module, ConsolidatorLayer):
    """A frozen ``nn.Linear`` plus Consolidator branches: ``y = W0 x + b0 + Σ_b DropPath(B_b shuffle_b(x) + c_b)``."""

    def __init__(self, base_layer: nn.Linear, adapter_name: str, **kwargs: Any) -> None:
        super().__init__()
        ConsolidatorLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, **kwargs)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for name in self.active_adapters:
            if name not in self.consolidator_patterns:
                continue
            bias = self.consolidator_bias.get(name, None)
            if name in self.consolidator_delta:
                delta_w, _ = self.delta_weight_and_bias(name)
                xa = self._cast_input_dtype(x, delta_w.dtype)
                result = result + F.linear(xa, delta_w, bias).to(result.dtype)
                continue
            branches = self.consolidator_branches[name]
            xa = self._cast_input_dtype(x, branches[0].weight.dtype)
            for branch in branches:
                result = result + drop_path(branch(xa), self.consolidator_rep_drop[name], self.training).to(
                    result.dtype
                )
            if bias is not None:
                result = result + bias.to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "consolidator." + super().__repr__()
