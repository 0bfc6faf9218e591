from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils.error import NoMatchingPeftModuleError
from torch import nn

from ...peft_hooks import ValidatedLoadMixin, undo_injection
from ...targeting import candidate_names, model_type_of, targeted_modules, unwrap_to_tuner_layers
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


class ConsolidatorModel(ValidatedLoadMixin, BaseTuner):
    """Creates a Consolidator model from a pretrained transformers model (Hao et al., ICLR 2023).

    Use it through peft: ``get_peft_model(model, ConsolidatorConfig(...))``. Saving stores the consolidated sparse
    delta of every layer (``consolidator_delta``: the values of ΔW on its fixed support, row-major) and the bias delta
    (``consolidator_bias``); peft's loaders split such a file exactly back into live branches (trainable with
    ``is_trainable=True``, resumable by the Trainer); ``merge_and_unload`` adds the deltas into the frozen weights and
    returns the plain model.
    """

    method_name = "Consolidator"
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
            # Every LayerNorm of the adapted towers ("vit", "vision_model", "text_model", or the whole model).
            towers = {_tower_of(name) for name, _ in targets}
            layernorms = [
                name
                for name, module in model.named_modules()
                if isinstance(module, nn.LayerNorm) and any(name.startswith(tower) for tower in towers)
                and ".modules_to_save." not in name and ".original_module" not in name
            ]
            existing = list(config.modules_to_save or [])
            config.modules_to_save = existing + [name for name in layernorms if name not in existing]
        super().inject_adapter(model, adapter_name, *args, state_dict=state_dict, **kwargs)

    def _matched_targets(self, model: nn.Module, config: ConsolidatorConfig) -> list[tuple[str, nn.Linear]]:
        matched = targeted_modules(model, config, self.prefix, nn.Linear, "Consolidator", "adapts nn.Linear layers only")
        if not matched:
            raise NoMatchingPeftModuleError(
                f"No nn.Linear of {type(model).__name__} matches target_modules={config.target_modules!r}"
                f"{f' with layers_to_transform={config.layers_to_transform!r}' if config.layers_to_transform else ''}"
                f". Candidate Linear layers: {candidate_names(model, nn.Linear)}."
            )
        return [(name, base) for name, _, base in matched]

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
            new_module = target
        else:
            new_module = ConsolidatorLinear(base, adapter_name, **layer_kwargs)
            if adapter_name not in self.active_adapters:
                new_module.requires_grad_(False)
            self._replace_module(parent, target_name, new_module, target)
        if config.consolidated:
            new_module.to_consolidated(adapter_name, with_bias=config.rep_bias or config.train_bias)

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
        """Consolidated mode replaces each layer's branch tensors by ``consolidator_delta`` (ΔW's values on the
        support, row-major) and ``consolidator_bias`` (Δb = bias delta + branch biases), cast to storage_dtype."""
        selected = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        dtype = _STORAGE_DTYPES[config.storage_dtype]
        if config.save_mode == "consolidated":
            for name, layer in unwrap_to_tuner_layers(model, ConsolidatorLayer):
                if adapter_name not in layer.consolidator_patterns:
                    continue
                name = name.removeprefix("_fsdp_wrapped_module.")
                for key in [k for k in selected if k.startswith(f"{name}.consolidator_")]:
                    del selected[key]
                with torch.no_grad():
                    values, bias = layer.consolidated_values(adapter_name)
                selected[f"{name}.consolidator_delta.{adapter_name}"] = values
                if bias is not None:
                    selected[f"{name}.consolidator_bias.{adapter_name}"] = bias.detach()
        return {
            k: (v.to(dtype).contiguous() if ".consolidator_" in k and v.is_floating_point() else v)
            for k, v in selected.items()
        }

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # Branch tensors sit one level deeper than peft expects (consolidator_branches.<adapter>.<i>.weight).
        key = key.replace(f".consolidator_branches.{adapter_name}.", ".consolidator_branches.")
        return super()._remove_adapter_name_from_key(key, adapter_name)

    # -- loading ------------------------------------------------------------------------------------------------
    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """A consolidated file loads into live branches (PeftModel.from_pretrained, load_adapter, Trainer resume,
        set_peft_model_state_dict): each layer's stored ΔW values and Δb are split exactly into its branch tensors
        (``ConsolidatorLayer.split_consolidated``). Only transformers' own ``load_adapter``, which bypasses this hook,
        keeps the consolidated state (one delta vector per layer)."""
        if any(".consolidator_delta" in key for key in state_dict):
            state_dict = _split_consolidated(model, config, adapter_name, state_dict)
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        return {k: _cast_like_model(model, k, v) for k, v in remapped.items()}


def _split_consolidated(model, config, adapter_name, state_dict):
    """Replaces every layer's ``consolidator_delta``/``consolidator_bias`` by the branch tensors they split into; on a
    delta whose length is not the layer's support size, raises before any layer changes and undoes the injection."""
    layers = {}
    for name, layer in unwrap_to_tuner_layers(model, ConsolidatorLayer):
        if adapter_name in layer.consolidator_patterns:
            layers[name.removeprefix("base_model.model.")] = layer
    stored = {key.removeprefix("base_model.model.").removesuffix(".consolidator_delta"): key
              for key in state_dict if key.endswith(".consolidator_delta")}
    split_dict = dict(state_dict)
    pending = []
    for name, layer in layers.items():  # model order, so that an error names the first bad layer
        if name not in stored:
            continue  # left to the file check, which names the missing tensor
        key = stored[name]
        values, prefix = state_dict[key], key.removesuffix("consolidator_delta")
        if (prefix + "consolidator_bias" in state_dict) != (config.rep_bias or config.train_bias):
            continue  # a damaged file: left unsplit, so the file check names the layer
        expected = tuple(layer.consolidator_support[adapter_name].shape)
        for part in ("consolidator_delta", "consolidator_bias"):
            tensor = state_dict.get(prefix + part)
            if tensor is not None and not tensor.is_floating_point():
                undo_injection(model, adapter_name)
                raise ValueError(
                    f"{part} of layer '{name}' is stored as {tensor.dtype} in the Consolidator adapter file, but the "
                    "layer holds float values: the file is damaged or was not written by this method."
                )
        if tuple(values.shape) != expected:
            undo_injection(model, adapter_name)
            raise ValueError(
                f"consolidator_delta of layer '{name}' has shape "
                f"{tuple(values.shape)} in the Consolidator adapter file, but the adapter config needs {expected}: the "
                "file and its adapter_config.json disagree, or the file targets another model."
            )
        bias = split_dict.pop(prefix + "consolidator_bias", None)
        del split_dict[key]
        pending.append((prefix, layer, values, bias))
    for prefix, layer, values, bias in pending:
        layer.restore_branches(adapter_name, rep_bias=config.rep_bias, train_bias=config.train_bias)
        with torch.no_grad():
            for rest, value in layer.split_consolidated(adapter_name, values, bias).items():
                split_dict[prefix + rest] = value
    return split_dict


def _tower_of(module_name: str) -> str:
    """The path of the transformer a block Linear belongs to: everything before its `layers` list (with a trailing
    dot), e.g. 'vision_model.' for 'vision_model.encoder.layers.0.mlp.fc1'; '' when there is no such list."""
    parts = module_name.split(".")
    for i, part in enumerate(parts):
        if part in ("layers", "layer", "encoder"):
            return "".join(p + "." for p in parts[:i])
    return ""


def _cast_like_model(model: nn.Module, key: str, value: torch.Tensor) -> torch.Tensor:
    """Stored values may be fp16/bf16 (storage_dtype); load them in the dtype of the parameter they fill."""
    if ".consolidator_" not in key or not value.is_floating_point():
        return value
    try:
        target = model.get_parameter(key.removeprefix("_orig_mod."))
    except AttributeError:
        return value
    return value.to(target.dtype) if target.dtype.is_floating_point else value
