"""MaPLe-style deep multimodal prompts on Hugging Face CLIP (spec qprompt.md b.2, clip_prompt_learning.md e.5), as
hooks that read the prompt tensors of a `QPromptLayer`:

- vision embeddings (after positional embeddings, before `pre_layrnorm`): append proj(ctx), m tokens;
- text encoder layer i = 1..J-1 (input): positions 1..m of the prompt-format rows <- deep text prompt i;
- vision encoder layer i = 1..J-1 (input): the last m tokens <- coupling_i(deep text prompt i).
Layer 0 of the text tower gets ctx through the embeddings (the layer itself). Every hook is the identity while no
MaPLe adapter is active (disabled, merged, another host), so the base model is unchanged then.
"""

from __future__ import annotations

import torch
from torch import nn


def clip_parts(model: nn.Module) -> tuple[list[nn.Module], nn.Module, list[nn.Module]]:
    """(text encoder layers, vision embeddings, vision encoder layers) of a CLIPModel."""
    text, vision = getattr(model, "text_model", None), getattr(model, "vision_model", None)
    if text is None or vision is None:
        raise ValueError(
            f"host='maple' needs a CLIPModel with text and vision towers; {type(model).__name__} has "
            f"{'no vision tower' if vision is None else 'no text tower'}."
        )
    return list(text.encoder.layers), vision.embeddings, list(vision.encoder.layers)


def check_depth(model: nn.Module, depth: int) -> None:
    text_layers, _, vision_layers = clip_parts(model)
    if depth > min(len(text_layers), len(vision_layers)):
        raise ValueError(
            f"prompt_depth={depth} exceeds the number of encoder layers (text {len(text_layers)}, vision "
            f"{len(vision_layers)})."
        )


def _replace_hidden(args, kwargs, hidden):
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _hidden(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def install_hooks(layer, model: nn.Module) -> None:
    """Registers the deep-prompt hooks for `layer` (once); handles are kept on the layer for `remove_hooks`."""
    if layer._maple_hooks:
        return
    text_layers, vision_embeddings, vision_layers = clip_parts(model)

    def text_hook(i):
        def hook(module, args, kwargs):
            name = layer.maple_adapter()
            settings = layer.qprompt_settings.get(name) if name else None
            rows = layer._prompt_rows
            if settings is None or i >= settings.prompt_depth or rows is None or not bool(rows.any()):
                return None
            hidden = _hidden(args, kwargs)
            m = settings.maple_n_ctx
            prompt = layer.value(name, f"deep_text_{i}").to(hidden.dtype)
            mixed = torch.where(rows[:, None, None], prompt.expand(hidden.shape[0], -1, -1), hidden[:, 1:1 + m])
            return _replace_hidden(args, kwargs, torch.cat([hidden[:, :1], mixed, hidden[:, 1 + m:]], dim=1))
        return hook

    def vision_embed_hook(module, args, output):
        name = layer.maple_adapter()
        if name is None:
            return None
        ctx = layer.value(name, "ctx")
        tokens = nn.functional.linear(ctx, layer.value(name, "proj_weight"), layer.value(name, "proj_bias"))
        return torch.cat([output, tokens.to(output.dtype).expand(output.shape[0], -1, -1)], dim=1)

    def vision_hook(i):
        def hook(module, args, kwargs):
            name = layer.maple_adapter()
            settings = layer.qprompt_settings.get(name) if name else None
            if settings is None or i >= settings.prompt_depth:
                return None
            hidden = _hidden(args, kwargs)
            m = settings.maple_n_ctx
            tokens = nn.functional.linear(layer.value(name, f"deep_text_{i}"),
                                          layer.value(name, f"coupling_{i}_weight"),
                                          layer.value(name, f"coupling_{i}_bias")).to(hidden.dtype)
            return _replace_hidden(args, kwargs,
                                   torch.cat([hidden[:, :-m], tokens.expand(hidden.shape[0], -1, -1)], dim=1))
        return hook

    handles = [vision_embeddings.register_forward_hook(vision_embed_hook)]
    for i in range(1, len(text_layers)):
        handles.append(text_layers[i].register_forward_pre_hook(text_hook(i), with_kwargs=True))
    for i in range(1, len(vision_layers)):
        handles.append(vision_layers[i].register_forward_pre_hook(vision_hook(i), with_kwargs=True))
    layer._maple_hooks = handles


def remove_hooks(layer) -> None:
    for handle in layer._maple_hooks:
        handle.remove()
    layer._maple_hooks = []
