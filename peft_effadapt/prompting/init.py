"""Initial values shared by the prompt layers: the device new adapter tensors live on, the embedding rows of the
`ctx_init` words, CoOp's context initialisation and the test-time perturbation of `init_weights=False`."""

from __future__ import annotations

import torch

from .config import ContextPromptConfig


def adapter_device(tok: torch.Tensor) -> torch.device:
    """The token-embedding table's device; CPU while the model is on the meta device (low_cpu_mem_usage loads, where
    the loaded state dict replaces these values)."""
    return tok.device if tok.device.type != "meta" else torch.device("cpu")


def token_rows(tok: torch.Tensor, token_ids) -> torch.Tensor | None:
    """fp32 copies of the embedding rows of `token_ids` (the `ctx_init` words), or None when there are no ids or the
    table is on the meta device (its values are unknown)."""
    if token_ids is None or tok.device.type == "meta":
        return None
    return tok[torch.as_tensor(list(token_ids), device=tok.device)].detach().float().clone()


def initial_context(tok: torch.Tensor, config: ContextPromptConfig, shape: tuple[int, ...]) -> torch.Tensor:
    """CoOp's context initialisation: the `ctx_init` word embeddings (broadcast over classes for class-specific
    context), otherwise N(0, init_std²); perturbed when `init_weights=False`."""
    rows = token_rows(tok, config.ctx_init_token_ids)
    if rows is not None:
        ctx = rows.expand(shape).clone()
    else:
        ctx = torch.randn(shape, device=adapter_device(tok)) * config.init_std
    return perturbed(ctx, config)


def perturbed(tensor: torch.Tensor, config: ContextPromptConfig) -> torch.Tensor:
    """`init_weights=False` (peft's convention for tests): add N(0, 0.5²) so the adapter is far from its init."""
    return tensor if config.init_weights else tensor + torch.randn_like(tensor) * 0.5


def placeholder_row(tok: torch.Tensor, config: ContextPromptConfig) -> torch.Tensor:
    """The placeholder token's embedding (fp32), zeros while the table is on the meta device."""
    row = token_rows(tok, [config.placeholder_token_id])
    return row[0] if row is not None else torch.zeros(tok.shape[1])
