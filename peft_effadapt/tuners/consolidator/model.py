from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_target_module_exists
from peft.utils.error import NoMatchingPeftModuleError
from torch import nn

from ...targeting import candidate_names, model_type_of, unwrap_to_tuner_layers
from .config import ConsolidatorConfig
from .layer import ConsolidatorLayer, ConsolidatorLinear
from .pattern import BranchPattern

# Block Linears per model type (spec §g). The pooler, projections, patch embedding and heads are not targeted.
_VIT_BLOCK_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]
_CLIP_BLOCK_LINEARS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
TARGET_MODULE_MAPPING = {
    "vit": _VIT_BLOCK_LINEARS,
    "clip": _CLIP_BLOCK_LINEARS,
    "clip_vision_model": _CLIP_BLOCK_LINEARS,
    "clip_text_model": _CLIP_BLOCK_LINEARS,
}

_STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ConsolidatorModel(BaseTuner):
    """Creates a Consolidator model from a pretrained transformers model (Hao et al., ICLR 2023).

    Use it through peft: ``get_peft_model(model, ConsolidatorConfig(...))``. Saving stores the consolidated sparse
    delta of every layer (``consolidator_delta``: the values of ΔW on its fixed support, row-major) and the bias delta
    (``consolidator_bias``); loading such a file gives layers in the consolidated state; ``merge_and_unload`` adds the
    deltas into the frozen weights and returns the plain model.
    """

    prefix: str = "consolidator_"
    tuner_layer_cls = ConsolidatorLayer
    target_module_mapping = TARGET_MODULE_MAPPING

    # -- injection ----------------------------------------------------------------------------------------------
    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, state_dict=None, **kwargs) -> None:
        """Validates every target before the first module is replaced, so a failure leaves the model untouched."""
        config: ConsolidatorConfig = self.peft_config[adapter_name]
        if config.target_modules is None:
            model_type = model_type_of(model)
            if model_type not in self.target_module_mapping:
                raise ValueError(
                    f"ConsolidatorConfig has no default target_modules for model type {model_type!r} "
                    f"({type(model).__name__}); supported: {sorted(self.target_module_mapping)}. "
                    "Pass target_modules explicitly."
                )
        config = self._prepare_adapter_config(config, self.get_model_config(model))
        targets = self._matched_targets(model, config)
        for name, module in targets:
            self._branch_patterns(config, name, module)  # raises on a bad group count
        if config.train_layernorm:
            layernorms = [
                name
                for name, module in model.named_modules()
                if isinstance(module, nn.LayerNorm) and not isinstance(module, BaseTunerLayer)
                and ".modules_to_save." not in name and ".original_module" not in name
            ]
            existing = list(config.modules_to_save or [])
            config.modules_to_save = existing + [name for name in layernorms if name not in existing]
        super().inject_adapter(model, adapter_name, *args, state_dict=state_dict, **kwargs)

    def _matched_targets(self, model: nn.Module, config: ConsolidatorConfig) -> list[tuple[str, nn.Linear]]:
        matched = []
        for name, module in model.named_modules():
            if not name or ".consolidator_" in name or not check_target_module_exists(config, name):
                continue
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            if not isinstance(base, nn.Linear):
                raise TypeError(
                    f"Consolidator adapts nn.Linear layers only, but target_modules={config.target_modules!r} "
                    f"matched '{name}' ({type(base).__name__})."
                )
            matched.append((name, base))
        if not matched:
            raise NoMatchingPeftModuleError(
                f"No nn.Linear of {type(model).__name__} matches target_modules={config.target_modules!r}"
                f"{f' with layers_to_transform={config.layers_to_transform!r}' if config.layers_to_transform else ''}"
                f". Candidate Linear layers: {candidate_names(model, nn.Linear)}."
            )
        return matched

    def _branch_patterns(self, config: ConsolidatorConfig, name: str, linear: nn.Linear) -> list[BranchPattern]:
        d_in, d_out = linear.in_features, linear.out_features
        groups = config.fc_groups or [min(d_in, d_out) // 2]
        leaf = name.rsplit(".", 1)[-1]
        fused = config.qkv_grouping == "fused" and leaf in config.qkv_names
        offset = config.qkv_names.index(leaf) * d_out if fused else 0
        patterns = []
        for g, shuffle in zip(groups, config.shuffle_flags):
            try:
                patterns.append(
                    BranchPattern(d_in, d_out, g, shuffle, row_offset=offset, virtual_rows=3 * d_out if fused else None)
                )
            except ValueError as err:
                raise ValueError(
                    f"Consolidator cannot group layer '{name}' (in_features={d_in}, out_features={d_out}) with "
                    f"{g} groups: {err}"
                ) from None
        return patterns

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        layer_kwargs = dict(
            patterns=self._branch_patterns(config, current_key, base),
            rep_drop=config.rep_drop,
            rep_bias=config.rep_bias,
            train_bias=config.train_bias,
            init_range=config.init_range if config.init_weights else 0.5,
        )
        if isinstance(target, ConsolidatorLayer):
            target.update_layer(adapter_name, inference_mode=config.inference_mode, **layer_kwargs)
            return
        new_module = ConsolidatorLinear(base, adapter_name, **layer_kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    # -- merging ------------------------------------------------------------------------------------------------
    def _check_merge_allowed(self):
        super()._check_merge_allowed()
        with_layernorms = [
            name for name in self.active_adapters if getattr(self.peft_config[name], "train_layernorm", False)
        ]
        if len(with_layernorms) > 1:
            raise ValueError(
                f"Cannot merge Consolidator adapters {with_layernorms} together: each carries its own LayerNorm "
                "copies (train_layernorm=True), and only one set can be kept."
            )

    # -- saving: stage-1 consolidation --------------------------------------------------------------------------
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        selected = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        dtype = _STORAGE_DTYPES[config.storage_dtype]
        for name, layer in unwrap_to_tuner_layers(model, ConsolidatorLayer):
            if adapter_name not in layer.consolidator_patterns:
                continue
            name = name.removeprefix("_fsdp_wrapped_module.")
            for key in [k for k in selected if k.startswith(f"{name}.consolidator_")]:
                del selected[key]
            if config.save_mode == "branches" and adapter_name in layer.consolidator_branches:
                for i, branch in enumerate(layer.consolidator_branches[adapter_name]):
                    selected[f"{name}.consolidator_branches.{adapter_name}.{i}.weight"] = branch.weight.detach()
                    if branch.bias is not None:
                        selected[f"{name}.consolidator_branches.{adapter_name}.{i}.bias"] = branch.bias.detach()
                if adapter_name in layer.consolidator_bias:
                    selected[f"{name}.consolidator_bias.{adapter_name}"] = layer.consolidator_bias[adapter_name].detach()
                continue
            with torch.no_grad():
                values, bias = layer.consolidated_values(adapter_name)
            selected[f"{name}.consolidator_delta.{adapter_name}"] = values.to(dtype).contiguous()
            if bias is not None:
                selected[f"{name}.consolidator_bias.{adapter_name}"] = bias.detach().to(dtype).contiguous()
        return {k: (v.to(dtype) if ".consolidator_" in k and v.is_floating_point() else v) for k, v in selected.items()}

    # -- loading ------------------------------------------------------------------------------------------------
    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Checks the stored tensors against the model's patterns before anything is loaded, and puts layers whose
        file holds a consolidated delta into the consolidated state."""
        try:
            plan = _plan_load(model, adapter_name, state_dict)
        except ValueError:
            _undo_injection(model, adapter_name)
            raise
        for layer, has_bias in plan:
            layer.to_consolidated(adapter_name, with_bias=has_bias)
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        return {k: _cast_like_model(model, k, v) for k, v in remapped.items()}


def _plan_load(model: nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor]):
    """Layers to switch to the consolidated state; raises ValueError naming the first mismatch found."""
    checkpoint_layers = {
        key.split(".consolidator_")[0].removeprefix("base_model.model.") for key in state_dict if ".consolidator_" in key
    }
    plan, seen = [], set()
    for name, layer in unwrap_to_tuner_layers(model, ConsolidatorLayer):
        if adapter_name not in layer.consolidator_patterns:
            continue
        ckpt_name = name.removeprefix("base_model.model.")
        seen.add(ckpt_name)
        keys = {k.removeprefix("base_model.model."): v for k, v in state_dict.items()}
        delta = keys.get(f"{ckpt_name}.consolidator_delta")
        branch_keys = [k for k in keys if k.startswith(f"{ckpt_name}.consolidator_branches.")]
        if delta is None and not branch_keys:
            raise ValueError(
                f"The Consolidator adapter file has no tensors for layer '{ckpt_name}', which its config targets: "
                "the file is damaged or belongs to another model."
            )
        bias = keys.get(f"{ckpt_name}.consolidator_bias")
        if bias is not None and tuple(bias.shape) != (layer.out_features,):
            raise ValueError(
                f"consolidator_bias of layer '{ckpt_name}' has shape {tuple(bias.shape)}, expected "
                f"({layer.out_features},)."
            )
        if delta is not None:
            expected = layer.consolidator_support[adapter_name].numel()
            if delta.dim() != 1 or delta.numel() != expected:
                raise ValueError(
                    f"consolidator_delta of layer '{ckpt_name}' holds {tuple(delta.shape)} values, but the adapter "
                    f"config's pattern for this {layer.in_features}->{layer.out_features} layer has {expected}: the "
                    "file and its adapter_config.json disagree, or the file targets another model."
                )
            plan.append((layer, bias is not None))
            continue
        for i, branch in enumerate(layer.consolidator_branches[adapter_name]):
            weight = keys.get(f"{ckpt_name}.consolidator_branches.{i}.weight")
            if weight is None or weight.shape != branch.weight.shape:
                found = None if weight is None else tuple(weight.shape)
                raise ValueError(
                    f"Branch {i} of layer '{ckpt_name}' has weight shape {found} in the file, expected "
                    f"{tuple(branch.weight.shape)}."
                )
    unknown = sorted(checkpoint_layers - seen)
    if unknown:
        raise ValueError(
            f"The Consolidator adapter file has tensors for layers the model does not adapt: {unknown[:5]}"
            f"{' ...' if len(unknown) > 5 else ''}. It belongs to another model or config."
        )
    return plan


def _cast_like_model(model: nn.Module, key: str, value: torch.Tensor) -> torch.Tensor:
    """Stored values may be fp16/bf16 (storage_dtype); load them in the dtype of the parameter they fill."""
    if ".consolidator_" not in key or not value.is_floating_point():
        return value
    try:
        target = model.get_parameter(key.removeprefix("_orig_mod."))
    except AttributeError:
        return value
    return value.to(target.dtype) if target.dtype.is_floating_point else value


def _undo_injection(model: nn.Module, adapter_name: str) -> None:
    """Removes the adapter whose load failed, so that the user's model is as it was before the call."""
    tuner = getattr(model, "base_model", None)
    if not isinstance(tuner, BaseTuner):
        return
    if list(tuner.peft_config) == [adapter_name]:
        tuner.unload()
        tuner.peft_config.pop(adapter_name, None)
    else:
        tuner.delete_adapter(adapter_name)
        getattr(model, "peft_config", {}).pop(adapter_name, None)
