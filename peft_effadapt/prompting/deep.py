"""MaPLe's deep multimodal prompts on Hugging Face CLIP, shared by `MaPLeModel` and QPrompt's MaPLe host.

Written as hooks (small callable objects bound to the `DeepPromptLayer`, the text-embeddings layer of the adapter, so
that a deep copy of the model is hooked to its own layer) that read the layer's prompt tensors:

- vision embeddings (after positional embeddings, before `pre_layrnorm`): append proj(ctx), m tokens;
- text encoder layer i = 1..J-1 (input): the m context positions after BOS of the prompt-format rows <- deep
  text prompt i;
- vision encoder layer i = 1..J-1 (input): the last m tokens <- coupling_i(deep text prompt i).

Layer 0 of the text tower gets the context through the embeddings (the layer itself). Every hook is the identity
while no deep-prompt adapter is active (disabled, merged, another method), so the base model is unchanged then.
The visual prompts change the image encoder, so a deep-prompt adapter cannot be merged into CLIP's weights.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPModel

from ..targeting import unwrap_to_tuner_layers
from .config import DeepPromptConfig, DeepPromptShape
from .layer import ContextPromptLayer, prompt_rows
from .tuner import ContextPromptTuner


def clip_parts(model: nn.Module) -> tuple[list[nn.Module], nn.Module, list[nn.Module]]:
    """(text encoder layers, vision embeddings, vision encoder layers) of a CLIPModel (or a subclass)."""
    text, vision = getattr(model, "text_model", None), getattr(model, "vision_model", None)
    if not isinstance(model, CLIPModel) or text is None or vision is None:
        raise ValueError(
            f"MaPLe deep prompts need a CLIPModel (text and vision towers); got {type(model).__name__}. Supported "
            "families: CLIPModel and its subclasses. SigLIP is refused: its vision tower has no class token and pools "
            "all tokens through an attention head, so MaPLe's appended visual prompts would enter the pooled image "
            "feature, unlike MaPLe on CLIP (class-token pooling)."
        )
    return list(text.encoder.layers), vision.embeddings, list(vision.encoder.layers)


def check_depth(model: nn.Module, depth: int) -> None:
    text_layers, _, vision_layers = clip_parts(model)
    if depth > min(len(text_layers), len(vision_layers)):
        raise ValueError(
            f"prompt_depth={depth} exceeds the number of encoder layers (text {len(text_layers)}, vision "
            f"{len(vision_layers)})."
        )


def vision_width(model: nn.Module) -> int | None:
    """Hidden size of the CLIP vision tower, or None when the model has none."""
    vision = getattr(getattr(model, "config", None), "vision_config", None)
    return getattr(vision, "hidden_size", None) if getattr(model, "vision_model", None) is not None else None


class DeepPromptLayer(ContextPromptLayer):
    """A prompt layer some of whose adapters are MaPLe deep prompts. Subclasses implement `deep_shape(name)` (None for
    an adapter without deep prompts) and `deep_value(name, key)` (the tensor the hooks read, train/eval aware)."""

    def __init__(self, base_layer: nn.Module, vision_width: int | None = None) -> None:
        super().__init__(base_layer)
        self.vision_width = vision_width  # of the CLIP vision tower the visual prompts enter
        self._prompt_rows: torch.Tensor | None = None  # rows of the current text batch in prompt format

    def deep_shape(self, adapter_name: str) -> DeepPromptShape | None:
        raise NotImplementedError

    def deep_value(self, adapter_name: str, key: str) -> torch.Tensor:
        raise NotImplementedError

    def visual_prompt_terms(self, adapter_name: str, depth: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(text prompt, weight, bias) of the Linear that gives the m visual prompts of vision depth `depth`:
        proj(ctx) at 0, coupling_i(deep text prompt i) at i >= 1."""
        text, linear = ("ctx", "proj") if depth == 0 else (f"deep_text_{depth}", f"coupling_{depth}")
        value = self.deep_value
        return value(adapter_name, text), value(adapter_name, f"{linear}_weight"), value(adapter_name, f"{linear}_bias")

    def deep_adapter(self) -> str | None:
        """The active adapter if it has deep prompts and the layer is enabled and unmerged, else None."""
        if self.disable_adapters or self.merged:
            return None
        name = self._active_prompt_adapter()
        return name if name is not None and self.deep_shape(name) is not None else None

    def forward(self, input_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        name = self.deep_adapter()
        self._prompt_rows = prompt_rows(input_ids, self.slots(name)) if name and input_ids is not None else None
        return super().forward(input_ids=input_ids, position_ids=position_ids, inputs_embeds=inputs_embeds)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        names = adapter_names or [n for n in self.active_adapters if self.has_adapter(n)]
        deep = [n for n in names if self.has_adapter(n) and self.deep_shape(n) is not None]
        if deep:
            raise ValueError(
                f"Adapter '{deep[0]}' has MaPLe deep prompts: its vision prompts change the image encoder and cannot "
                "be merged into CLIP's weights. Keep the adapter unmerged."
            )
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)


def _hidden(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args, kwargs, hidden):
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


class DeepPromptHook:
    """Base of the deep-prompt hooks: a callable bound to the `DeepPromptLayer` whose tensors it writes and to the
    encoder depth it serves. The layer is a module of the same model, so `copy.deepcopy` of the model copies the hook
    bound to the copy's layer (a closure would keep reading the original's)."""

    def __init__(self, layer: DeepPromptLayer, depth: int) -> None:
        self.layer, self.depth = layer, depth

    def active(self) -> tuple[str | None, DeepPromptShape | None]:
        """(adapter, shape) when the active adapter has deep prompts reaching this depth, else (None, None)."""
        name = self.layer.deep_adapter()
        shape = self.layer.deep_shape(name) if name else None
        return (name, shape) if shape is not None and self.depth < shape.depth else (None, None)


class VisionPromptTokens(DeepPromptHook):
    """Forward hook of the vision embeddings: appends the m visual prompts proj(ctx)."""

    def __call__(self, module, args, output):
        name, _ = self.active()
        if name is None:
            return None
        tokens = nn.functional.linear(*self.layer.visual_prompt_terms(name, 0)).to(output.dtype)
        return torch.cat([output, tokens.expand(output.shape[0], -1, -1)], dim=1)


class DeepTextPrompt(DeepPromptHook):
    """Forward pre-hook of text encoder layer `depth`: writes deep text prompt `depth` at the m context positions of
    the prompt-format rows (read from the layer, which found them in this forward's input_ids)."""

    def __call__(self, module, args, kwargs):
        name, shape = self.active()
        rows = self.layer._prompt_rows
        if name is None or rows is None:
            return None
        hidden = _hidden(args, kwargs)
        start = self.layer.slots(name).start
        end = start + shape.n_ctx
        if hidden.shape[1] < end:
            return None  # rows without the placeholder keep their states through `where` (no data-dependent exit)
        prompt = self.layer.deep_value(name, f"deep_text_{self.depth}").to(hidden.dtype)
        mixed = torch.where(rows[:, None, None], prompt.expand(hidden.shape[0], -1, -1), hidden[:, start:end])
        return _with_hidden(args, kwargs, torch.cat([hidden[:, :start], mixed, hidden[:, end:]], dim=1))


class DeepVisionPrompt(DeepPromptHook):
    """Forward pre-hook of vision encoder layer `depth`: the last m tokens <- coupling_depth(deep text prompt)."""

    def __call__(self, module, args, kwargs):
        name, shape = self.active()
        if name is None:
            return None
        hidden = _hidden(args, kwargs)
        tokens = nn.functional.linear(*self.layer.visual_prompt_terms(name, self.depth)).to(hidden.dtype)
        prompts = tokens.expand(hidden.shape[0], -1, -1)
        return _with_hidden(args, kwargs, torch.cat([hidden[:, :-shape.n_ctx], prompts], dim=1))


def deep_prompt_hooks(layer: DeepPromptLayer, model: nn.Module) -> list:
    """Registers the deep-prompt hooks of `layer` on both towers of `model`; returns their handles."""
    text_layers, vision_embeddings, vision_layers = clip_parts(model)
    handles = [vision_embeddings.register_forward_hook(VisionPromptTokens(layer, 0))]
    for i in range(1, len(text_layers)):
        handles.append(text_layers[i].register_forward_pre_hook(DeepTextPrompt(layer, i), with_kwargs=True))
    for i in range(1, len(vision_layers)):
        handles.append(vision_layers[i].register_forward_pre_hook(DeepVisionPrompt(layer, i), with_kwargs=True))
    return handles


class DeepPromptTuner(ContextPromptTuner):
    """Base of the tuners whose adapters may carry deep prompts: checks the depth before anything is replaced,
    attaches the hooks after injection and refuses to merge them (`ContextPromptTuner` detaches them on unload)."""

    def _vision_width(self) -> int | None:
        return vision_width(self.model)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        config: DeepPromptConfig = self.peft_config[adapter_name]
        if config.deep_prompts:
            check_depth(model, config.prompt_depth)  # before anything is replaced (m <= n: the config checks it)
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        if config.deep_prompts:
            for layer in self._deep_layers():
                layer.attach_hooks(deep_prompt_hooks, model)

    def _deep_layers(self) -> list[DeepPromptLayer]:
        return [layer for _, layer in unwrap_to_tuner_layers(self.model, self.tuner_layer_cls)]

    def _unload_and_optionally_merge(self, merge=True, progressbar: bool = False, safe_merge: bool = False,
                                     adapter_names=None):
        if merge:
            self._check_merge_allowed()
            for layer in self._deep_layers():
                names = adapter_names or [n for n in layer.active_adapters if layer.has_adapter(n)]
                if any(layer.deep_shape(n) is not None for n in names if layer.has_adapter(n)):
                    layer.merge(adapter_names=names)  # raises the deep-prompt error before anything changes
        return super()._unload_and_optionally_merge(merge=merge, progressbar=progressbar, safe_merge=safe_merge,
                                                    adapter_names=adapter_names)
