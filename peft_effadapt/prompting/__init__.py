"""CLIP/SigLIP text-prompt core shared by the prompt methods (CoOp, RLP, QPrompt, which quantises a CoOp, RLP or
MaPLe prompt; CoCoOp, MaPLe): context rows written at placeholder positions (after BOS for CLIP, from position 0 for
SigLIP) in the token embeddings of `text_model.embeddings`, input_ids untouched (pooling and masks unchanged), merged
into the position-embedding table where exact (unified context)."""

from .config import ContextPromptConfig, DeepPromptConfig, DeepPromptShape
from .family import CLIP_TEXT, SIGLIP_TEXT, TextFamily, text_family
from .layer import ContextPromptLayer, PromptSlots, prompt_rows, write_context
from .text import (
    PromptBatch,
    context_token_ids,
    placeholder_prompt_ids,
    single_token_id,
    special_ids,
    template_prompt_ids,
    token_prompt_ids,
)
from .tuner import ContextPromptTuner, active_prompt_config, find_text_embeddings

__all__ = [
    "CLIP_TEXT",
    "SIGLIP_TEXT",
    "TextFamily",
    "text_family",
    "token_prompt_ids",
    "ContextPromptConfig",
    "DeepPromptConfig",
    "DeepPromptShape",
    "ContextPromptLayer",
    "ContextPromptTuner",
    "PromptBatch",
    "PromptSlots",
    "active_prompt_config",
    "context_token_ids",
    "find_text_embeddings",
    "placeholder_prompt_ids",
    "prompt_rows",
    "single_token_id",
    "special_ids",
    "template_prompt_ids",
    "write_context",
]
