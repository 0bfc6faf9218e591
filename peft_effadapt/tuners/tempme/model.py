from __future__ import annotations

import re

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_target_module_exists
from peft.utils.error import NoMatchingPeftModuleError
from torch import nn

from ...merging import ungroup_protected
from ...peft_hooks import ValidatedLoadMixin
from ..tome.blocks import SUPPORTED_ATTENTION, MergeContext, layer_index, layout_of
from ..tome.model import TokenMergingModel
from .config import TempMeConfig
from .layer import TempMeBlock, TempMeLayer, TempMeSettings
from .schedule import LayerPlan, tempme_plan

# model class -> (vision backbone path, vision layers regex, text layers regex or None)
SUPPORTED_MODELS = {
    "CLIPModel": ("vision_model", r"vision_model\.encoder\.layers\.\d+", r"text_model\.encoder\.layers\.\d+"),
    "CLIPVisionModel": ("", r"encoder\.layers\.\d+", None),
}


def _family(model: nn.Module):
    family = SUPPORTED_MODELS.get(type(model).__name__)
    if family is None:
        raise ValueError(
            f"TempMe supports {', '.join(SUPPORTED_MODELS)} (a CLIP image encoder whose frames are merged); got "
            f"{type(model).__name__}."
        )
    return family


def _vision_config(model: nn.Module):
    return model.config.vision_config if hasattr(model.config, "vision_config") else model.config


class VideoRuntime:
    """Shared by the backbone hooks: the merge context, which adapter runs, and the frame count of this forward."""

    def __init__(self, context: MergeContext):
        self.context = context
        self.probe: TempMeLayer | None = None  # first vision layer: tells whether TempMe is active
        self.merged_frames: int | None = None  # set by merge_and_unload: the frame count the merged model runs
        self.frames_in_batch = 0

    def active_frames(self) -> int | None:
        if self.merged_frames is not None:
            return self.merged_frames
        layer = self.probe
        if layer is None or layer.disable_adapters:
            return None
        name = layer._active_merging_adapter()
        return None if name is None else layer.tempme_frames[name]


class VideoInputHook:
    """Forward pre-hook of the vision backbone: resets the merge state; accepts (B, F, C, H, W) videos (flattened to
    B·F frames) and checks that a (N, C, H, W) batch holds whole videos."""

    def __init__(self, runtime: VideoRuntime):
        self.runtime = runtime

    def __call__(self, module, args, kwargs):
        self.runtime.context.reset()
        frames = self.runtime.active_frames()
        in_kwargs = "pixel_values" in kwargs
        pixels = kwargs["pixel_values"] if in_kwargs else (args[0] if args else None)
        if pixels is None or frames is None:
            return None
        if pixels.ndim == 5:
            if pixels.shape[1] != frames:
                raise ValueError(
                    f"TempMe was configured for num_frames={frames}, got videos of {pixels.shape[1]} frames "
                    f"(pixel_values {tuple(pixels.shape)}); sample {frames} frames per video (pad short videos by "
                    "repeating frames and pass a video mask to the retrieval wrapper)."
                )
            pixels = pixels.flatten(0, 1)
        elif pixels.ndim != 4 or pixels.shape[0] % frames:
            raise ValueError(
                f"TempMe expects videos: pixel_values of shape (batch, {frames}, C, H, W) or (batch·{frames}, C, H, W) "
                f"with the {frames} frames of each video contiguous; got {tuple(pixels.shape)}. Single images cannot "
                "run through TempMe's clip merging (disable the adapter for images)."
            )
        self.runtime.frames_in_batch = pixels.shape[0]
        if in_kwargs:
            kwargs["pixel_values"] = pixels
        else:
            args = (pixels, *args[1:])
        return args, kwargs


class FramePoolingHook:
    """Forward hook of the vision backbone: after TempMe, every final sequence holds the class tokens of all its
    frames in front; `pooler_output` becomes `post_layernorm` of each of them (B·F rows, frame order), i.e. the
    same per-frame layout as plain CLIP, so mean pooling over frames gives the video feature (spec §b.5)."""

    def __init__(self, runtime: VideoRuntime):
        self.runtime = runtime

    def __call__(self, module, args, output):
        if self.runtime.active_frames() is None or self.runtime.context.final().num_tokens is None:
            return None
        last = output[0] if isinstance(output, tuple) else output.last_hidden_state
        cls_per_sequence = self.runtime.frames_in_batch // last.shape[0]
        if cls_per_sequence <= 1:
            return None
        pooled = module.post_layernorm(ungroup_protected(last, cls_per_sequence))
        if isinstance(output, tuple):
            return (output[0], pooled, *output[2:])
        output.pooler_output = pooled
        return output


class TempMeModel(ValidatedLoadMixin, BaseTuner):
    """TempMe (Shen et al., ICLR 2025) for HF `CLIPModel` / `CLIPVisionModel`.

    Use it through peft: ``get_peft_model(clip, TempMeConfig())``. Frames go in as ``(B, F, C, H, W)`` or
    ``(B·F, C, H, W)`` (videos contiguous); `get_image_features` / `pooler_output` still return one row per frame
    (B·F, frame order) — the class tokens that TempMe keeps for every frame — so a mean over frames gives the
    video embedding (`peft_effadapt.tasks.CLIPVideoRetrieval`). `last_hidden_state` is the merged sequence of each
    video (B rows; fewer tokens). Saved: per wrapped layer `tempme_lora_A`/`tempme_lora_B` and, in ClipMe layers,
    `tempme_clip_pos`. ``merge_and_unload`` folds LoRA into q/k/v and keeps the schedule running (base classes and
    state-dict keys); `unload` gives the plain model. Attention: eager or sdpa (proportional attention is an
    additive mask); `output_hidden_states` has a changing batch and length per layer.
    """

    prefix: str = "tempme_"
    method_name = "TempMe"
    tuner_layer_cls = TempMeLayer
    target_module_mapping: dict = {}

    # -- injection ----------------------------------------------------------------------------------------------
    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, state_dict=None, **kwargs) -> None:
        """Validates model, schedule, targets and attention backend before the first module is replaced."""
        config: TempMeConfig = self.peft_config[adapter_name]
        backbone, vision_regex, text_regex = _family(model)
        vision = _vision_config(model)
        num_tokens = (vision.image_size // vision.patch_size) ** 2 + 1
        if config.num_tokens is not None and config.num_tokens != num_tokens:
            raise ValueError(
                f"The TempMe adapter was made for {config.num_tokens} tokens per frame, but this "
                f"{type(model).__name__} produces {num_tokens} (image_size / patch_size differ)."
            )
        plan = tempme_plan(num_tokens, vision.num_hidden_layers, config.num_frames, config.imgme_r,
                           config.clip_merge_layers, config.clip_group_sizes, config.cross_clip_merge_ratio,
                           config.intra_clip_merge_ratio)
        implementation = getattr(vision, "_attn_implementation", None) or "eager"
        if implementation not in SUPPORTED_ATTENTION:
            raise ValueError(
                f"TempMe passes proportional attention as an additive float mask, which only the 'eager' and 'sdpa' "
                f"attention implementations take; {type(model).__name__} uses {implementation!r}. Load it with "
                "attn_implementation='sdpa' (or 'eager')."
            )
        use_text = text_regex is not None and config.lora_on_text and config.lora_r > 0
        default = vision_regex if not use_text else rf"({vision_regex}|{text_regex})"
        target_modules = config.target_modules if config.target_modules is not None else default
        self._check_targets(model, config, target_modules, vision_regex, vision.num_hidden_layers)
        config.target_modules = target_modules
        config.num_tokens = num_tokens
        self._plans = getattr(self, "_plans", {})
        self._plans[adapter_name] = plan
        self._install_hooks(model, backbone)
        super().inject_adapter(model, adapter_name, *args, state_dict=state_dict, **kwargs)
        for module in model.modules():
            if isinstance(module, TempMeLayer) and module.layer_name.startswith(backbone):
                if self._runtime.probe is None and layer_index(module.layer_name) == 0 and \
                        re.fullmatch(vision_regex, module.layer_name):
                    self._runtime.probe = module
                module.tempme_frames[adapter_name] = config.num_frames

    def _check_targets(self, model, config, target_modules, vision_regex, num_layers) -> None:
        probe = TempMeConfig(target_modules=target_modules, exclude_modules=config.exclude_modules)
        matched, vision = [], []
        for name, module in model.named_modules():
            if not name or f".{self.prefix}" in name or ".base_layer" in name:
                continue
            if not check_target_module_exists(probe, name):
                continue
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            if layout_of(base) is None or "CLIP" not in type(base).__name__:
                raise TypeError(
                    f"TempMe targets whole CLIP encoder layers, but target_modules={target_modules!r} matched "
                    f"'{name}' ({type(base).__name__})."
                )
            matched.append(name)
            if re.fullmatch(vision_regex, name):
                vision.append(layer_index(name))
        if not matched:
            raise NoMatchingPeftModuleError(
                f"No CLIP encoder layer of {type(model).__name__} matches target_modules={target_modules!r}."
            )
        if sorted(vision) != list(range(num_layers)):
            raise ValueError(
                f"TempMe needs every vision encoder layer as a target (token counts flow from layer to layer); "
                f"target_modules={target_modules!r} matched vision layers {sorted(vision)} of {num_layers}."
            )

    def _install_hooks(self, model: nn.Module, backbone: str) -> None:
        if getattr(self, "_runtime", None) is not None:
            return
        self._merge_context = MergeContext()
        self._runtime = VideoRuntime(self._merge_context)
        module = model.get_submodule(backbone) if backbone else model
        self._hooks = [
            module.register_forward_pre_hook(VideoInputHook(self._runtime), with_kwargs=True),
            module.register_forward_hook(FramePoolingHook(self._runtime)),
        ]

    def _remove_hooks(self) -> None:
        for handle in getattr(self, "_hooks", []):
            handle.remove()
        self._hooks = []

    def _prepare_adapter_config(self, peft_config, model_config):
        return peft_config

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        layer = layer_index(current_key)
        backbone, vision_regex, _ = _family(self.model)
        plan: LayerPlan | None = self._plans[adapter_name][layer] if re.fullmatch(vision_regex, current_key) else None
        settings = TempMeSettings(plan, config.prop_attn, config.lora_r, config.lora_scale, config.lora_shared_qkv_a,
                                  config.clip_position_embedding)
        extra = dict(lora_dropout=config.lora_dropout, init_weights=config.init_weights)
        if isinstance(target, TempMeLayer):
            target.update_layer(adapter_name, settings, inference_mode=config.inference_mode, **extra)
            return
        new_module = TempMeBlock(target, adapter_name, layout_of(target), layer, current_key, self._merge_context,
                                 settings, **extra)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    _replace_module = TokenMergingModel._replace_module

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        for name in self.active_adapters:
            config = self.peft_config[name]
            if config.full_finetune and not config.inference_mode:
                for param_name, param in model.named_parameters():
                    if param_name.split(".")[-1] != "logit_scale":  # CLIP's temperature stays frozen (official)
                        param.requires_grad_(True)

    # -- unloading ----------------------------------------------------------------------------------------------
    def unload(self) -> nn.Module:
        """The plain base model: layers restored, hooks removed (after full fine-tuning: the fine-tuned CLIP)."""
        model = super().unload()
        self._remove_hooks()
        return model

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names=None) -> nn.Module:
        """LoRA folded into q/k/v; the returned base-class model **keeps merging tokens** with the adapter's
        schedule and clip position embeddings (`unload()` gives the plain model)."""
        frames = self._runtime.active_frames()
        model = super().merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)
        self._runtime.merged_frames = frames
        return model

    # -- inspection ---------------------------------------------------------------------------------------------
    def tempme_plan(self, adapter_name: str = "default") -> list[LayerPlan]:
        """The per-block plan of `adapter_name` (tokens per sequence, r_c, r_i, class tokens, sequences per video)."""
        return self._plans[adapter_name]

    def token_counts(self) -> list[int | None]:
        """Tokens per sequence entering each vision layer and leaving the last one, as seen in the last forward."""
        return self._merge_context.token_counts()

    def merge_state(self):
        return self._merge_context.final()

    @staticmethod
    def trainable_parameter_count(model: nn.Module) -> int:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)


