"""transformers' zero-shot image-classification pipeline on a merged prompt adapter (CoOp, RLP, QPrompt)."""

from __future__ import annotations

from torch import nn

from ..prompting import ContextPromptConfig, active_prompt_config


def zero_shot_pipeline_kwargs(model_or_config: nn.Module | ContextPromptConfig, tokenizer=None) -> dict[str, str]:
    """Keyword arguments that make `pipeline("zero-shot-image-classification")` use a merged prompt adapter.

    A merged adapter lives in the position-embedding rows 1..n and is exact only for prompts whose tokens 1..n are the
    placeholder, which is what the returned template gives. Call it on the PeftModel (or its config) before
    merge_and_unload(): `pipe(images, candidate_labels=names, **zero_shot_pipeline_kwargs(peft_model))`.

    Args:
        model_or_config (nn.Module | PeftConfig): The PeftModel with a CoOp/RLP/QPrompt adapter, or its config.
        tokenizer (optional): With it, the template is checked to tokenise to n placeholder ids.

    Returns:
        dict[str, str]: `{"hypothesis_template": "X X X X {}."}` for n = 4 context tokens, placeholder "X" and
        suffix ".".

    Raises:
        TypeError: Not a prompt adapter (or its config).
        ValueError: A class-specific context (it cannot merge), unresolved token ids, or a tokenizer that does not
            give n placeholder ids.
    """
    config = model_or_config if isinstance(model_or_config, ContextPromptConfig) else active_prompt_config(
        model_or_config
    )
    if config is None:
        raise TypeError(
            "zero_shot_pipeline_kwargs needs a PeftModel with an active CoOp/RLP/QPrompt adapter or its config, got "
            f"{type(model_or_config).__name__}."
        )
    if config.csc:
        raise ValueError("a class-specific context (csc=True) cannot be merged, so no pipeline template serves it.")
    if config.n_ctx is None:
        raise ValueError("the config's token ids are not resolved; call config.resolve_tokens(tokenizer) first.")
    template = " ".join([config.placeholder_token] * config.n_ctx) + " {}" + config.class_template_suffix
    if tokenizer is not None:
        ids = list(tokenizer(template.format("a"), add_special_tokens=False)["input_ids"])[: config.n_ctx]
        expected = config.placeholder_token_id
        if expected is None or ids != [expected] * config.n_ctx:
            raise ValueError(
                f"hypothesis template {template!r} starts with token ids {ids} with this tokenizer, not "
                f"{config.n_ctx} x the placeholder id {expected}; the merged adapter would not apply."
            )
    return {"hypothesis_template": template}
