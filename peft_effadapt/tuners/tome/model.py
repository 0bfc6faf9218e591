from __future__ import annotations

import copy

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_target_module_exists
from peft.utils.error import NoMatchingPeftModuleError
from torch import nn

from ...adapter_checks import ValidatedLoadMixin
from ...merging import check_schedule, resolve_schedule, token_counts
from .blocks import (
    SUPPORTED_ATTENTION,
    SUPPORTED_MODELS,
    MergeContext,
    MergeSettings,
    ResetMergeState,
    TokenState,
    backbone_name,
    initial_token_count,
    layer_index,
    layout_of,
    model_family,
    vision_config_of,
)
from .config import TokenMergingConfig
from .layer import TokenMergingLayer, ToMeBlock, ToMeLayer


class TokenMergingModel(ValidatedLoadMixin, BaseTuner):
    """Shared tuner machinery of the token-merging types: targets whole encoder layers, resolves and validates the
    merging schedule before the first module is replaced, owns the per-forward `MergeContext` and the backbone
    pre-hook that resets it."""

    method_name = "ToMe"
    prefix: str = "tome_"
    tuner_layer_cls = TokenMergingLayer
    target_module_mapping: dict = {}

    # -- injection ----------------------------------------------------------------------------------------------
    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, state_dict=None, **kwargs) -> None:
        """Validates model family, targets, schedule and attention backend before the first module is replaced, so
        a failure leaves the model untouched."""
        config: TokenMergingConfig = self.peft_config[adapter_name]
        family = model_family(model, self.method_name)
        protected = family.protected if config.protected_tokens == "auto" else config.protected_tokens
        num_tokens = initial_token_count(model, family)
        target_modules = config.target_modules if config.target_modules is not None else family.layers_regex
        probe = copy.copy(config)
        probe.target_modules = target_modules
        targets = self._matched_layers(model, probe, family)
        num_layers = len(targets)
        layer_names = [name for name, _ in targets]
        if config.layer_schedule is not None:
            schedule = list(config.layer_schedule)
            if len(schedule) != num_layers:
                raise ValueError(
                    f"The {self.method_name} adapter was made for {len(schedule)} layers (layer_schedule={schedule}), "
                    f"but {type(model).__name__} has {num_layers} encoder layers."
                )
            if config.num_tokens is not None and config.num_tokens != num_tokens and self._shapes_depend_on_tokens:
                raise ValueError(
                    f"The {self.method_name} adapter was made for {config.num_tokens} input tokens, but this "
                    f"{type(model).__name__} produces {num_tokens} (image_size / patch_size differ); its weight "
                    "shapes follow the schedule of the original resolution."
                )
        else:
            schedule = resolve_schedule(config.merge_schedule, num_layers, num_tokens, protected)
        if not getattr(config, "clamp_schedule", False):
            check_schedule(schedule, num_tokens, protected, layer_names)
        implementation = getattr(vision_config_of(model, family), "_attn_implementation", None) or "eager"
        if implementation not in SUPPORTED_ATTENTION:
            raise ValueError(
                f"{self.method_name} passes proportional attention as an additive float mask, which only the 'eager' and "
                f"'sdpa' attention implementations take; {type(model).__name__} uses {implementation!r}. Load it "
                "with attn_implementation='sdpa' (or 'eager')."
            )
        self._validate_method(model, config, schedule, targets)
        # everything checked: record the resolved schedule and change the model
        config.target_modules = target_modules
        config.layer_schedule = schedule
        config.num_tokens = num_tokens
        self._protected = protected
        self._install_context(model, family)
        super().inject_adapter(model, adapter_name, *args, state_dict=state_dict, **kwargs)

    _shapes_depend_on_tokens = False

    def _validate_method(self, model, config, schedule, targets) -> None:
        """Extra checks of a subclass (PYRA), run before anything is changed."""

    def _matched_layers(self, model: nn.Module, config, family) -> list[tuple[str, nn.Module]]:
        matched = []
        for name, module in model.named_modules():
            if not name or f".{self.prefix}" in name or ".base_layer" in name:
                continue
            if not check_target_module_exists(config, name):
                continue
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            if layout_of(base) is None:
                raise TypeError(
                    f"{self.method_name} targets whole encoder layers (ViTLayer, DeiTLayer, CLIPEncoderLayer), but "
                    f"target_modules={config.target_modules!r} matched '{name}' ({type(base).__name__})."
                )
            if "text_model" in name.split("."):
                raise ValueError(
                    f"{self.method_name} never merges the CLIP text tower (causal mask, EOS pooling); "
                    f"target_modules={config.target_modules!r} matched '{name}'."
                )
            matched.append((name, module))
        if not matched:
            raise NoMatchingPeftModuleError(
                f"No encoder layer of {type(model).__name__} matches target_modules={config.target_modules!r}. "
                f"Default for this model: {model_family(model, self.method_name).layers_regex!r}."
            )
        backbones = {backbone_name(name) for name, _ in matched}
        if len(backbones) != 1:
            raise ValueError(f"{self.method_name} targets must lie in one encoder, got layers of {sorted(backbones)}.")
        num_layers = vision_config_of(model, family).num_hidden_layers
        indices = sorted(layer_index(name) for name, _ in matched)
        if indices != list(range(num_layers)):
            raise ValueError(
                f"{self.method_name} needs every encoder layer as a target (token counts and sizes flow from layer to "
                f"layer); target_modules={config.target_modules!r} matched layers {indices} of {num_layers}."
            )
        return sorted(matched, key=lambda item: layer_index(item[0]))

    def _install_context(self, model: nn.Module, family) -> None:
        if getattr(self, "_merge_context", None) is None:
            self._merge_context = MergeContext()
            self._merge_hooks = {}
        if family.backbone not in self._merge_hooks:
            backbone = model.get_submodule(family.backbone) if family.backbone else model
            self._merge_hooks[family.backbone] = backbone.register_forward_pre_hook(
                ResetMergeState(self._merge_context)
            )

    def _remove_hooks(self) -> None:
        for handle in getattr(self, "_merge_hooks", {}).values():
            handle.remove()
        self._merge_hooks = {}

    def _prepare_adapter_config(self, peft_config, model_config):
        return peft_config

    def _settings(self, config: TokenMergingConfig, layer: int) -> MergeSettings:
        return MergeSettings(
            r=config.layer_schedule[layer],
            protected=getattr(self, "_protected", 1),
            prop_attn=config.prop_attn,
            trace_source=config.trace_source,
            clamp=getattr(config, "clamp_schedule", False),
            method=self.method_name,
        )

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        layer = layer_index(current_key)
        settings = self._settings(config, layer)
        if isinstance(target, TokenMergingLayer):
            target.update_layer(adapter_name, settings, inference_mode=config.inference_mode,
                                **self._layer_kwargs(config, layer, target.get_base_layer()))
            return
        new_module = self._new_block(target, adapter_name, current_key, layer, settings, config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _layer_kwargs(self, config, layer: int, base: nn.Module) -> dict:
        return {}

    def _new_block(self, target, adapter_name, name, layer, settings, config) -> nn.Module:
        return ToMeBlock(target, adapter_name, layout_of(target), layer, name, self._merge_context, settings)

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        """Whole encoder layers have no `.weight`: swap the module and move the adapter's own sub-modules to the
        device of the layer (peft's version assumes Linear-like targets; peft_integration.md §1.6)."""
        setattr(parent, child_name, new_module)
        reference = next(child.parameters(), None)
        if reference is None or not isinstance(new_module, BaseTunerLayer):
            return
        for name, module in new_module.named_modules():
            if self.prefix in name and not any(p.is_meta for p in module.parameters()):  # meta: low_cpu_mem_usage
                module.to(reference.device)

    # -- unloading ----------------------------------------------------------------------------------------------
    def unload(self) -> nn.Module:
        """The base model without any merging: encoder layers restored, the backbone hook removed."""
        model = super().unload()
        self._remove_hooks()
        return model

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names=None) -> nn.Module:
        """Folds weight deltas (PYRA's LoRA) into the base weights and returns the model **still patched**: its class
        and state-dict keys are the base model's, but every encoder layer keeps merging tokens with the adapter's
        schedule (and PYRA's modulation). `unload()` gives the plain, unpatched model."""
        return super().merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)

    # -- inspection ---------------------------------------------------------------------------------------------
    def merge_state(self) -> TokenState:
        """Token sizes (B×N×1) and, with trace_source, the source map (B×N×N_0) after the last layer of the last
        forward."""
        return self._merge_context.final()

    def token_counts(self) -> list[int | None]:
        """Tokens entering each layer and leaving the last one, as seen in the last forward."""
        return self._merge_context.token_counts()

    def planned_token_counts(self, adapter_name: str = "default") -> list[int]:
        """Token counts the schedule of `adapter_name` implies at the configured resolution."""
        config = self.peft_config[adapter_name]
        return token_counts(config.layer_schedule, config.num_tokens)


class ToMeModel(TokenMergingModel):
    """Token Merging (Bolya et al., ICLR 2023) as a weight-free PEFT type.

    Use it through peft: ``get_peft_model(vit, ToMeConfig(merge_schedule=16, modules_to_save=["classifier"]))``.
    Supported: {models}. Nothing is saved but `modules_to_save` and the resolved schedule (in the config);
    ``merge_and_unload`` returns the base class still merging tokens, ``unload`` the plain model.
    """.format(models=", ".join(SUPPORTED_MODELS))

    method_name = "ToMe"
    prefix: str = "tome_"
    tuner_layer_cls = ToMeLayer
