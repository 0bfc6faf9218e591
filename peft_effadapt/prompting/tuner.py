"""`BaseTuner` logic shared by the CLIP/SigLIP text-prompt methods: find the text embeddings, resolve token ids, validate
everything before the model is touched, swap the embeddings module, check adapter files before loading them."""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_target_module_exists
from torch import nn

from ..peft_hooks import ValidatedLoadMixin
from ..targeting import unwrap_to_tuner_layers
from .config import ContextPromptConfig
from .family import text_family
from .layer import ContextPromptLayer


def _is_text_embeddings(module: nn.Module) -> bool:
    """A CLIP or SigLIP text embeddings module (or a subclass of one): checked by class, never by class name."""
    return text_family(module) is not None


def find_text_embeddings(model: nn.Module, config: ContextPromptConfig, method: str) -> tuple[str, nn.Module]:
    """(name, module) of the one CLIP/SigLIP text embeddings module the config targets; raises naming the model class
    when the model has no such text tower, and the value of target_modules when it matches nothing suitable."""
    candidates = [
        (name, module) for name, module in model.named_modules()
        if name and ".base_layer" not in name and _is_text_embeddings(module)
    ]
    if not candidates:
        raise ValueError(
            f"{method} needs a CLIP or SigLIP text tower: a CLIPModel, CLIPTextModel or CLIPTextModelWithProjection, "
            f"a SiglipModel or SiglipTextModel (or a subclass), i.e. a model with a CLIPTextEmbeddings or "
            f"SiglipTextEmbeddings module; {type(model).__name__} has none."
        )
    if config.target_modules is None:
        matched = candidates
    else:
        matched = [(n, m) for n, m in model.named_modules()
                   if n and ".base_layer" not in n and check_target_module_exists(config, n)]
        wrong = [(n, type(m).__name__) for n, m in matched if not _is_text_embeddings(m)]
        if wrong:
            raise TypeError(
                f"{method} adapts the CLIP/SigLIP text embeddings only, but target_modules={config.target_modules!r} "
                f"matched {wrong[0][0]!r} ({wrong[0][1]})."
            )
        if not matched:
            raise ValueError(
                f"target_modules={config.target_modules!r} matches no module of {type(model).__name__}; the "
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


class ContextPromptTuner(ValidatedLoadMixin, BaseTuner):
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
        family = text_family(embeddings)
        if config.context_start is not None and config.context_start != family.context_start:
            raise ValueError(
                f"the {self.method_name} adapter was made for a text tower whose context starts at position "
                f"{config.context_start}, but {type(model).__name__} is a {family.name} model (context at "
                f"{family.context_start}): the adapter belongs to another model family."
            )
        if family.context_start + config.n_ctx + 1 > positions:
            raise ValueError(
                f"n_ctx={config.n_ctx} context tokens plus {'BOS and ' if family.has_bos else ''}EOS do not fit the "
                f"{positions} text positions of the {family.name} text tower."
            )
        if config.context_start is None and family.context_start != 1:
            config.context_start = family.context_start  # stored: the saved adapter reloads with this layout
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
        for head in ("logit_scale", "logit_bias"):  # spec pitfall: freeze CLIP's temperature (SigLIP's bias) explicitly
            param = getattr(model, head, None)
            if isinstance(param, nn.Parameter):
                param.requires_grad_(False)

    def _unload_and_optionally_merge(self, *args, **kwargs):
        """peft's unload; then the hooks the prompt layers kept on other modules (deep prompts, CoCoOp) go too."""
        layers = [layer for _, layer in unwrap_to_tuner_layers(self.model, self.tuner_layer_cls)]
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        for layer in layers:
            layer.detach_hooks()
        return model

    # -- inspection -----------------------------------------------------------------------------------------------
    def prompt_layer(self) -> ContextPromptLayer:
        layers = [m for _, m in unwrap_to_tuner_layers(self.model, self.tuner_layer_cls)]
        if not layers:
            raise ValueError(f"no {self.method_name} layer in the model (was it unloaded?).")
        return layers[0]


def active_prompt_config(model: nn.Module) -> ContextPromptConfig | None:
    """The config of the active prompt adapter of a PeftModel (None for a plain model or another method)."""
    configs = getattr(model, "peft_config", None)
    if not configs:
        return None
    active = getattr(model, "active_adapter", None)
    config = configs.get(active) if isinstance(active, str) else None
    return config if isinstance(config, ContextPromptConfig) else None
