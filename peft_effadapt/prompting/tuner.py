"""`BaseTuner` logic shared by the CLIP text-prompt methods: find the text embeddings, resolve token ids, validate
everything before the model is touched, swap the embeddings module, check adapter files before loading them."""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_target_module_exists
from peft.utils import ModulesToSaveWrapper
from torch import nn

from ..targeting import unwrap_to_tuner_layers
from .config import ContextPromptConfig
from .layer import ContextPromptLayer


def _is_text_embeddings(module: nn.Module) -> bool:
    if isinstance(module, BaseTunerLayer):
        module = module.get_base_layer()
    return (
        type(module).__name__.endswith("TextEmbeddings")
        and isinstance(getattr(module, "token_embedding", None), nn.Embedding)
        and isinstance(getattr(module, "position_embedding", None), nn.Embedding)
    )


def find_text_embeddings(model: nn.Module, config: ContextPromptConfig, method: str) -> tuple[str, nn.Module]:
    """(name, module) of the one CLIP text embeddings module the config targets; raises naming the model class when
    the model has no CLIP text tower, and the value of target_modules when it matches nothing suitable."""
    candidates = [
        (name, module) for name, module in model.named_modules()
        if name and ".base_layer" not in name and _is_text_embeddings(module)
    ]
    if not candidates:
        raise ValueError(
            f"{method} needs a CLIP text tower (CLIPModel or CLIPTextModel with a CLIPTextEmbeddings module), but "
            f"{type(model).__name__} has none."
        )
    if config.target_modules is None:
        matched = candidates
    else:
        matched = [(n, m) for n, m in model.named_modules()
                   if n and ".base_layer" not in n and check_target_module_exists(config, n)]
        wrong = [(n, type(m).__name__) for n, m in matched if not _is_text_embeddings(m)]
        if wrong:
            raise TypeError(
                f"{method} adapts the CLIP text embeddings only, but target_modules={config.target_modules!r} "
                f"matched {wrong[0][0]!r} ({wrong[0][1]})."
            )
        if not matched:
            raise ValueError(
                f"target_modules={config.target_modules!r} matches no module of {type(model).__name__}; the CLIP "
                f"text embeddings are at {[n for n, _ in candidates]}."
            )
    if len(matched) != 1:
        raise ValueError(
            f"{method} writes one prompt into one text tower, but {[n for n, _ in matched]} all match; set "
            "target_modules to one of them."
        )
    return matched[0]


def resolve_tokens(model: nn.Module, config: ContextPromptConfig, method: str) -> None:
    """Fills missing token ids from `config.tokenizer_name_or_path` or the base model's name_or_path."""
    if config.tokens_resolved:
        return
    source = config.tokenizer_name_or_path or getattr(model, "name_or_path", None) or None
    if not source:
        raise ValueError(
            f"{method}Config needs token ids for ctx_init={config.ctx_init!r} and placeholder_token="
            f"{config.placeholder_token!r}: call config.resolve_tokens(tokenizer), or set ctx_init_token_ids and "
            "placeholder_token_id, or tokenizer_name_or_path (the model has no name_or_path to load one from)."
        )
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as err:  # noqa: BLE001 - offline, missing files, ...: say what to do instead
        raise ValueError(
            f"{method}Config could not load a tokenizer from {source!r} to resolve its token ids ({err}); call "
            "config.resolve_tokens(tokenizer) or set ctx_init_token_ids and placeholder_token_id."
        ) from err
    config.resolve_tokens(tokenizer)


class ContextPromptTuner(BaseTuner):
    """Base of `CoOpModel` and `RLPModel`. Subclasses set `prefix`, `tuner_layer_cls`, `method_name` and
    implement `_new_layer`, `_layer_kwargs` and (optionally) `_validate`."""

    method_name = "prompt"
    target_module_mapping: dict = {}

    # -- injection ------------------------------------------------------------------------------------------------
    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, state_dict=None, **kwargs) -> None:
        """Validates model, config and token ids before the first module is replaced."""
        config: ContextPromptConfig = self.peft_config[adapter_name]
        name, embeddings = find_text_embeddings(model, config, self.method_name)
        resolve_tokens(model, config, self.method_name)
        base = embeddings.get_base_layer() if isinstance(embeddings, BaseTunerLayer) else embeddings
        vocab, dim = base.token_embedding.weight.shape
        positions = base.position_embedding.weight.shape[0]
        ids = [config.placeholder_token_id] + list(config.ctx_init_token_ids or [])
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise ValueError(
                f"token ids {bad} of the {self.method_name} config are outside the text vocabulary (size {vocab}) "
                f"of {type(model).__name__}: the ids come from another tokenizer."
            )
        if 1 + config.n_ctx + 1 > positions:
            raise ValueError(
                f"n_ctx={config.n_ctx} context tokens plus BOS and EOS do not fit the {positions} text positions."
            )
        self._validate(config, dim)
        if config.target_modules is None:
            config.target_modules = {name}
        super().inject_adapter(model, adapter_name, *args, state_dict=state_dict, **kwargs)

    def _validate(self, config: ContextPromptConfig, embed_dim: int) -> None:
        """Method-specific checks that need the model (e.g. rank <= d)."""

    def _prepare_adapter_config(self, peft_config, model_config):
        return peft_config

    def _new_layer(self, target: nn.Module, adapter_name: str, config: ContextPromptConfig) -> ContextPromptLayer:
        raise NotImplementedError

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, config, inference_mode=config.inference_mode)
            return
        new_module = self._new_layer(target, adapter_name, config)
        new_module.train(target.training)  # an eval-mode model stays in eval mode (no dropout) after injection
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        # The CLIP embeddings module has no `.weight`; peft's version would try to copy one when unloading.
        if not hasattr(new_module, "base_layer") and not hasattr(child.get_base_layer() if isinstance(
                child, BaseTunerLayer) else child, "weight"):
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        logit_scale = getattr(model, "logit_scale", None)  # spec pitfall: freeze CLIP's temperature explicitly
        if isinstance(logit_scale, nn.Parameter):
            logit_scale.requires_grad_(False)

    # -- inspection -----------------------------------------------------------------------------------------------
    def prompt_layer(self) -> ContextPromptLayer:
        layers = [m for _, m in unwrap_to_tuner_layers(self.model, self.tuner_layer_cls)]
        if not layers:
            raise ValueError(f"no {self.method_name} layer in the model (was it unloaded?).")
        return layers[0]

    # -- loading --------------------------------------------------------------------------------------------------
    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        try:
            check_prompt_tensors(model, adapter_name, state_dict, cls.tuner_layer_cls, cls.prefix, cls.method_name)
        except ValueError:
            undo_injection(model, adapter_name)
            raise
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)


def check_prompt_tensors(model: nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor],
                         layer_cls: type, prefix: str, method: str) -> None:
    """The file must hold exactly the adapter's tensors with the shapes the config implies; raises naming the first
    mismatch."""
    marker = "." + prefix
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if marker in key:
            layer_name, _, rest = key.removeprefix("base_model.model.").partition(marker)
            found.setdefault(layer_name, {})[prefix + rest] = value
    for name, layer in unwrap_to_tuner_layers(model, layer_cls):
        if not layer.has_adapter(adapter_name):
            continue
        name = name.removeprefix("base_model.model.")
        tensors = found.pop(name, {})
        expected = {}
        for key, param in layer.named_parameters():
            parts = key.split(".")
            if parts[0].startswith(prefix) and len(parts) > 1 and parts[1] == adapter_name:
                expected[".".join(parts[:1] + parts[2:])] = tuple(param.shape)
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if missing or extra:
            raise ValueError(
                f"The {method} adapter file does not match layer '{name}': missing tensors {missing or 'none'}, "
                f"unexpected tensors {extra or 'none'}. The file is damaged or its adapter_config.json does not "
                "describe it."
            )
        for key, shape in expected.items():
            if tuple(tensors[key].shape) != shape:
                raise ValueError(
                    f"{key} of layer '{name}' has shape {tuple(tensors[key].shape)} in the {method} adapter file, but "
                    f"the adapter config needs {shape}: the file and its adapter_config.json disagree."
                )
    if found:
        raise ValueError(f"The {method} adapter file has tensors for modules the model does not adapt: {sorted(found)}.")


def undo_injection(model: nn.Module, adapter_name: str) -> None:
    """Removes an adapter whose load failed, so that the user's model is as it was before the call."""
    tuner = getattr(model, "base_model", None)
    if not isinstance(tuner, BaseTuner):
        return
    if list(tuner.peft_config) == [adapter_name]:
        for module in tuner.model.modules():
            if isinstance(module, ModulesToSaveWrapper):
                module.set_adapter([])
        tuner.unload()
        tuner.peft_config.pop(adapter_name, None)
    else:
        tuner.delete_adapter(adapter_name)
        getattr(model, "peft_config", {}).pop(adapter_name, None)


def active_prompt_config(model: nn.Module) -> ContextPromptConfig | None:
    """The config of the active prompt adapter of a PeftModel (None for a plain model or another method)."""
    configs = getattr(model, "peft_config", None)
    if not configs:
        return None
    active = getattr(model, "active_adapter", None)
    config = configs.get(active) if isinstance(active, str) else None
    return config if isinstance(config, ContextPromptConfig) else None
