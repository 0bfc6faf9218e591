"""`BaseTuner` bases of the token-merging types: `MergingTuner` (whole encoder layers as targets, the per-forward
`MergeContext` and the backbone hooks that reset it, block creation, unloading, inspection; ToMe, PYRA and TempMe)
and `TokenMergingModel` (schedule-driven merging: ToMe and PYRA)."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils.error import NoMatchingPeftModuleError
from torch import nn

from ..peft_hooks import ValidatedLoadMixin
from ..targeting import targeted_modules
from .config import TokenMergingConfig
from .families import (
    LAYOUTS,
    ModelFamily,
    backbone_name,
    check_attention,
    initial_token_count,
    layer_index,
    layout_of,
    model_family,
    protected_count,
    vision_config_of,
)
from .layer import MergingBlock, TokenMergingLayer
from .pooling import SizeWeightedPooling, pooling_head
from .schedules import check_schedule, clamp_schedule, resolve_schedule, token_counts
from .state import MergeContext, MergeSettings, ResetMergeState, TokenState


class MergingTuner(ValidatedLoadMixin, BaseTuner):
    """Shared tuner machinery of the token-merging types. Subclasses set `method_name`, `prefix`, `tuner_layer_cls`,
    `block_cls` and implement `_layer_settings`."""

    method_name: str
    prefix: str
    tuner_layer_cls = TokenMergingLayer
    block_cls: type[MergingBlock]
    target_module_mapping: dict = {}

    def _prepare_adapter_config(self, peft_config, model_config):
        return peft_config

    # -- targets ------------------------------------------------------------------------------------------------
    def _find_encoder_layers(
        self, model: nn.Module, config, layer_classes: tuple[type, ...] = tuple(LAYOUTS), hint: str = ""
    ) -> list[tuple[str, nn.Module]]:
        """(name, module) of every module `config.target_modules` matches, each an encoder layer of `layer_classes`
        (or a subclass); raises TypeError for any other match and NoMatchingPeftModuleError for none."""
        names = ", ".join(cls.__name__ for cls in layer_classes)
        found = targeted_modules(
            model, config, self.prefix, layer_classes, self.method_name, f"targets whole encoder layers ({names})"
        )
        matched = [(name, module) for name, module, _ in found]
        if not matched:
            raise NoMatchingPeftModuleError(
                f"No encoder layer of {type(model).__name__} matches target_modules={config.target_modules!r}.{hint}"
            )
        return matched

    # -- per-forward state and backbone hooks -------------------------------------------------------------------
    def _hook_backbone(self, model: nn.Module, backbone: str, install: Callable[[nn.Module], list]) -> None:
        """Creates the merge context once and hooks the backbone once: `install(module)` returns the hook handles."""
        if getattr(self, "_merge_context", None) is None:
            self._merge_context = MergeContext()
            self._merge_hooks = {}
        if backbone not in self._merge_hooks:
            self._merge_hooks[backbone] = install(model.get_submodule(backbone) if backbone else model)

    def _remove_hooks(self) -> None:
        for handles in getattr(self, "_merge_hooks", {}).values():
            for handle in handles:
                handle.remove()
        self._merge_hooks = {}

    # -- blocks -------------------------------------------------------------------------------------------------
    def _layer_settings(self, config, adapter_name: str, name: str, layer: int) -> tuple[object, dict]:
        """(settings, extra keyword arguments of `update_layer`) of encoder layer `layer` called `name`."""
        raise NotImplementedError

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        layer = layer_index(current_key)
        settings, extra = self._layer_settings(config, adapter_name, current_key, layer)
        if isinstance(target, TokenMergingLayer):
            target.update_layer(adapter_name, settings, inference_mode=config.inference_mode, **extra)
            return
        new_module = self.block_cls(
            target, adapter_name, layout_of(target), layer, current_key, self._merge_context, settings, **extra
        )
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        """Whole encoder layers have no `.weight`: swap the module and move the adapter's own sub-modules to the
        device of the layer (peft's version assumes Linear-like targets)."""
        setattr(parent, child_name, new_module)
        reference = next(child.parameters(), None)
        if reference is None or not isinstance(new_module, BaseTunerLayer):
            return
        for name, module in new_module.named_modules():
            if self.prefix in name and not any(p.is_meta for p in module.parameters()):  # meta: low_cpu_mem_usage
                module.to(reference.device)

    # -- unloading and inspection -------------------------------------------------------------------------------
    def unload(self) -> nn.Module:
        """The base model without any merging: encoder layers restored, the backbone hooks removed."""
        model = super().unload()
        self._remove_hooks()
        return model

    def merge_state(self) -> TokenState:
        """Token sizes (B×N×1) and, with trace_source, the source map (B×N×N_0) after the last layer of the last
        forward."""
        return self._merge_context.final()

    def token_counts(self) -> list[int | None]:
        """Tokens (per sequence) entering each layer and leaving the last one, as seen in the last forward."""
        return self._merge_context.token_counts()


class TokenMergingModel(MergingTuner):
    """Schedule-driven token merging (ToMe, PYRA): targets every encoder layer of the vision tower, resolves and
    validates the merging schedule before the first module is replaced."""

    _shapes_depend_on_tokens = False  # PYRA: W_r has r_l rows, so the adapter only runs at its resolution

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, state_dict=None, **kwargs) -> None:
        """Validates model family, targets, schedule and attention backend before the first module is replaced, so
        a failure leaves the model untouched."""
        config: TokenMergingConfig = self.peft_config[adapter_name]
        family = model_family(model, self.method_name)
        protected = protected_count(model, family) if config.protected_tokens == "auto" else config.protected_tokens
        num_tokens = initial_token_count(model, family)
        target_modules = config.target_modules if config.target_modules is not None else family.layers_regex
        probe = copy.copy(config)
        probe.target_modules = target_modules
        targets = self._matched_layers(model, probe, family)
        schedule = self._layer_schedule(model, config, len(targets), num_tokens, protected)
        if getattr(config, "clamp_schedule", False):
            schedule = self._clamped(schedule, num_tokens, protected)
        else:
            check_schedule(schedule, num_tokens, protected, [name for name, _ in targets])
        check_attention(
            getattr(vision_config_of(model, family), "_attn_implementation", None), self.method_name,
            type(model).__name__,
        )
        self._validate_method(model, config, schedule, targets)
        # everything checked: record the resolved schedule and change the model
        config.target_modules = target_modules
        config.layer_schedule = schedule
        config.num_tokens = num_tokens
        self._protected = protected
        self._hook_backbone(model, family.backbone, self._backbone_hooks)
        super().inject_adapter(model, adapter_name, *args, state_dict=state_dict, **kwargs)

    def _backbone_hooks(self, backbone: nn.Module) -> list:
        """Resets the merge state before every forward; weights an attention-pooling head by token size."""
        handles = [backbone.register_forward_pre_hook(ResetMergeState(self._merge_context))]
        head = pooling_head(backbone)
        if head is not None:
            handles.append(head.register_forward_pre_hook(SizeWeightedPooling(self._merge_context), with_kwargs=True))
        return handles

    def _layer_schedule(self, model, config, num_layers: int, num_tokens: int, protected: int) -> list[int]:
        """The saved `layer_schedule` (checked against the model) or `merge_schedule` resolved for it."""
        if config.layer_schedule is None:
            return resolve_schedule(config.merge_schedule, num_layers, num_tokens, protected)
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
        return schedule

    def _clamped(self, schedule: list[int], num_tokens: int, protected: int) -> list[int]:
        """The schedule the forward executes, as the reference ToMe clamps it; one warning when it differs."""
        clamped = clamp_schedule(schedule, num_tokens, protected)
        if clamped != schedule:
            layers = [i for i, (r, c) in enumerate(zip(schedule, clamped)) if r != c]
            warnings.warn(
                f"{self.method_name}: the merge schedule {schedule} asks for more tokens than one bipartite step can "
                f"merge ((tokens - {protected} protected) // 2) in layer(s) {layers} at {num_tokens} input tokens; "
                f"clamped as the reference ToMe does. Resolved schedule: {clamped}; tokens per layer: "
                f"{token_counts(clamped, num_tokens)}. Pass clamp_schedule=False to get an error instead.",
                stacklevel=2,
            )
        return clamped

    def _validate_method(self, model, config, schedule, targets) -> None:
        """Extra checks of a subclass (PYRA), run before anything is changed."""

    def _matched_layers(self, model: nn.Module, config, family: ModelFamily) -> list[tuple[str, nn.Module]]:
        hint = f" Default for this model: {family.layers_regex!r}."
        matched = self._find_encoder_layers(model, config, hint=hint)
        for name, _ in matched:
            if "text_model" in name.split("."):
                raise ValueError(
                    f"{self.method_name} never merges the CLIP text tower (causal mask, EOS pooling); "
                    f"target_modules={config.target_modules!r} matched '{name}'."
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

    def _layer_settings(self, config: TokenMergingConfig, adapter_name: str, name: str, layer: int):
        settings = MergeSettings(
            r=config.layer_schedule[layer],
            protected=getattr(self, "_protected", 1),
            prop_attn=config.prop_attn,
            trace_source=config.trace_source,
            clamp=getattr(config, "clamp_schedule", False),
            method=self.method_name,
        )
        return settings, self._layer_kwargs(config)

    def _layer_kwargs(self, config) -> dict:
        """Extra keyword arguments of the method's `update_layer` (PYRA's LoRA and modulation settings)."""
        return {}

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names=None) -> nn.Module:
        """Folds weight deltas (PYRA's LoRA) into the base weights and returns the model **still patched**: its class
        and state-dict keys are the base model's, but every encoder layer keeps merging tokens with the adapter's
        schedule (and PYRA's modulation). `unload()` gives the plain, unpatched model."""
        return super().merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)

    def planned_token_counts(self, adapter_name: str = "default") -> list[int]:
        """Token counts the schedule of `adapter_name` implies at the configured resolution: what the forward
        executes there (a clamped schedule is stored clamped)."""
        config = self.peft_config[adapter_name]
        return token_counts(config.layer_schedule, config.num_tokens)
