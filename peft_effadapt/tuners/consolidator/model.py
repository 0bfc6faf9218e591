from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils.error import NoMatchingPeftModuleError
from torch import nn

from ...peft_hooks import ValidatedLoadMixin
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

    Use it through peft: ``get_peft_model(model, ConsolidatorConfig(...))``. An adapter is in one of two forms, and its
    file holds exactly that form, so every load gives back the very parameters that were saved:

    - **branches** (training): each branch's weight and bias and the Linear's bias delta. Checkpoints written while
      training (``save_pretrained``, the Trainer's) resume bit for bit.
    - **consolidated** (shipping, after `consolidate`): ΔW's values on its fixed support (``consolidator_delta``,
      row-major) and Δb (``consolidator_bias``) in ``storage_dtype``; ``consolidated: true`` in the saved config.

    ``merge_and_unload`` adds the delta of either form into the frozen weights and returns the plain model.
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

    # -- stage 1: consolidation for storage ------------------------------------------------------------------------
    def consolidate(self, adapter_names: str | list[str] | None = None) -> None:
        """Replaces the branches of each adapter by its consolidated sparse delta (stage 1 of the paper), in place.

        Afterwards ``save_pretrained``/``push_adapter_to_hub`` store only ΔW's values on the support and Δb, in
        ``storage_dtype`` (the values are rounded to it here, so the model computes what the file holds), and the
        saved config says ``consolidated: true``. Outputs in eval mode are unchanged (up to that rounding). Call it
        once training is over: the consolidated adapter still trains as one masked delta, but without branches and
        DropPath, and a training checkpoint in this form no longer resumes the branches.

        An adapter that is consolidated already is left as it is, so a second call changes nothing.

        Args:
            adapter_names: the adapter name or names to consolidate; default: every Consolidator adapter of the model.

        Raises:
            TypeError: ``adapter_names`` is not a name or a list of names (nothing is changed).
            ValueError: an adapter name the model does not hold (nothing is changed).
        """
        names = list(self.peft_config) if adapter_names is None else (
            [adapter_names] if isinstance(adapter_names, str) else adapter_names
        )
        if not isinstance(names, (list, tuple)) or not all(isinstance(name, str) for name in names):
            raise TypeError(f"consolidate() takes an adapter name or a list of names, got {adapter_names!r}.")
        unknown = [name for name in names if name not in self.peft_config]
        if unknown:
            raise ValueError(f"Cannot consolidate adapters {unknown}: the model holds {sorted(self.peft_config)}.")
        for name in names:
            config = self.peft_config[name]
            for _, layer in unwrap_to_tuner_layers(self.model, ConsolidatorLayer):
                if layer.holds_branches(name):
                    layer.to_consolidated(name, with_bias=config.rep_bias or config.train_bias,
                                          storage_dtype=_STORAGE_DTYPES[config.storage_dtype])
            config.consolidated = True

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """The adapter's tensors in the form its layers hold (see the class docstring); a consolidated layer's
        ``consolidator_delta`` and ``consolidator_bias`` in ``storage_dtype``, everything else as trained."""
        selected = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        dtype = _STORAGE_DTYPES[config.storage_dtype]
        consolidated = {key.partition(".consolidator_delta")[0] for key in selected if ".consolidator_delta" in key}
        return {
            key: value.to(dtype).contiguous()
            if key.partition(".consolidator_")[0] in consolidated and value.is_floating_point() else value
            for key, value in selected.items()
        }

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # Branch tensors sit one level deeper than peft expects (consolidator_branches.<adapter>.<i>.weight).
        key = key.replace(f".consolidator_branches.{adapter_name}.", ".consolidator_branches.")
        return super()._remove_adapter_name_from_key(key, adapter_name)

    # -- loading ------------------------------------------------------------------------------------------------
    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Every layer takes the form of its tensors in the file before they are loaded (peft's loaders,
        set_peft_model_state_dict, Trainer resume), so a consolidated file becomes consolidated layers and a branch
        file branches, each holding exactly the stored values. Stored fp16/bf16 values load in the layer's dtype. A
        file the checks refuse leaves an adapter the model held before as it was (its form too)."""
        consolidated, switched = config.consolidated, _take_form_of_file(model, config, adapter_name, state_dict)
        try:
            remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        except ValueError:
            config.consolidated = consolidated
            for layer, form in switched:
                if adapter_name in layer.consolidator_patterns:  # not removed with an adapter injected for this load
                    layer.put_adapter_form(adapter_name, form)
            raise
        return {k: _cast_like_model(model, k, v) for k, v in remapped.items()}


def _take_form_of_file(model, config, adapter_name, state_dict) -> list[tuple[ConsolidatorLayer, dict]]:
    """Switches each layer holding ``adapter_name`` to the form (branches or consolidated) its tensors in
    ``state_dict`` have, and records the form in ``config.consolidated``. Layers without tensors in the file are left
    to the file checks, which name them. Returns the switched layers with their earlier form (`adapter_form`)."""
    stored = {key.removeprefix("base_model.model.") for key in state_dict}
    forms, switched = [], []
    for name, layer in unwrap_to_tuner_layers(model, ConsolidatorLayer):
        if adapter_name not in layer.consolidator_patterns:
            continue
        name = name.removeprefix("base_model.model.").removeprefix("_fsdp_wrapped_module.")
        consolidated = f"{name}.consolidator_delta" in stored
        if not consolidated and not any(key.startswith(f"{name}.consolidator_branches.") for key in stored):
            continue
        forms.append(consolidated)
        if consolidated == layer.holds_branches(adapter_name):
            switched.append((layer, layer.adapter_form(adapter_name)))
            if consolidated:
                layer.to_consolidated(adapter_name, with_bias=config.rep_bias or config.train_bias)
            else:
                layer.restore_branches(adapter_name, rep_bias=config.rep_bias, train_bias=config.train_bias)
    if forms:
        config.consolidated = all(forms)
    return switched


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
