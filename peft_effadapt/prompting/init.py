"""Initial values of the prompt methods, one place each: the device new adapter tensors live on, the embedding rows of
the `ctx_init` words, the learned context (CoOp, CoCoOp, QPrompt's CoOp host, MaPLe's learned tokens), RLP's low-rank
prompt (RLP, QPrompt's RLP host), MaPLe's deep prompts (MaPLe, QPrompt's MaPLe host) and the test-time perturbation
of `init_weights=False`."""

from __future__ import annotations

import torch
from torch import nn

from .config import ContextPromptConfig, DeepPromptConfig


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


def placeholder_row(tok: torch.Tensor, config: ContextPromptConfig) -> torch.Tensor:
    """The placeholder token's embedding (fp32), zeros while the table is on the meta device."""
    row = token_rows(tok, [config.placeholder_token_id])
    return row[0] if row is not None else torch.zeros(tok.shape[1], device=adapter_device(tok))


def initial_context(tok: torch.Tensor, config: ContextPromptConfig, shape: tuple[int, ...]) -> torch.Tensor:
    """The learned context as CoOp initialises it: the first `shape[-2]` of the `ctx_init` word embeddings (broadcast
    over classes for class-specific context), otherwise N(0, init_std²)."""
    rows = token_rows(tok, config.ctx_init_token_ids)
    if rows is not None:
        return rows[: shape[-2]].expand(shape).clone()
    return torch.randn(shape, device=adapter_device(tok)) * config.init_std


def perturbed(tensor: torch.Tensor, config: ContextPromptConfig) -> torch.Tensor:
    """`init_weights=False` (peft's convention for tests): add N(0, 0.5²) so the adapter is far from its init."""
    return tensor if config.init_weights else tensor + torch.randn_like(tensor) * 0.5


def truncated_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A0 = U_r S_r^1/2 (n x r), B0 = S_r^1/2 V_r^T (r x d): the best rank-r factorisation of `matrix` (fp64 SVD,
    deterministic given the matrix, so the frozen residual can be rebuilt at load time)."""
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).float(), (root[:, None] * vh[:rank]).float()


def low_rank_prompt(tok: torch.Tensor, config: ContextPromptConfig, rank: int, init: str = "zero",
                    use_init_path: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(frozen path F, A, B) of RLP's prompt F + A @ B (n x d, A n x r, B r x d), with P0 the `ctx_init` embeddings
    (zeros without ctx_init): 'zero' F = P0, A = 0, B ~ N(0, init_std²) (zero-shot CLIP at init); 'svd' A B = the
    top-r SVD of P0, F = the residual; 'random' F = P0, A, B ~ N(0, init_std²). Without the init path F = 0 and A B
    starts from the SVD of P0 (random without ctx_init)."""
    n, d, device = config.n_ctx, tok.shape[1], adapter_device(tok)

    def normal(*size: int) -> torch.Tensor:
        return torch.randn(*size, device=device) * config.init_std

    p0 = token_rows(tok, config.ctx_init_token_ids)
    if p0 is None:
        p0 = torch.zeros(n, d, device=device)
    if not use_init_path:
        a, b = truncated_svd(p0, rank) if config.ctx_init_token_ids is not None else (normal(n, rank), normal(rank, d))
        return torch.zeros(n, d, device=device), a, b
    if init == "svd":
        a, b = truncated_svd(p0, rank)
        return p0 - a @ b, a, b
    if init == "zero":
        return p0, torch.zeros(n, rank, device=device), normal(rank, d)
    return p0, normal(n, rank), normal(rank, d)


def maple_prompt(tok: torch.Tensor, config: DeepPromptConfig, vision_width: int) -> tuple[dict, torch.Tensor]:
    """(learned tensors by name, fixed text rows) of a new MaPLe prompt, as MaPLe initialises them.

    The first m = `maple_n_ctx` of the n context rows are learned (`initial_context`); the other n - m stay fixed
    words ("of a" of "a photo of a"), or the placeholder's embedding without ctx_init. The shallow projection and
    every deep coupling map text width d to the vision width (each coupling starts as a copy of one nn.Linear
    initialisation, as the reference's `_get_clones` does); deep text prompts ~ N(0, init_std²).
    """
    shape = config.deep_shape()
    m, d, device = shape.n_ctx, tok.shape[1], adapter_device(tok)
    ctx = initial_context(tok, config, (m, d))
    rows = token_rows(tok, config.ctx_init_token_ids)
    frozen = rows[m:].clone() if rows is not None else placeholder_row(tok, config).expand(config.n_ctx - m, d).clone()
    proj = nn.Linear(d, vision_width, device=device)
    coupling = nn.Linear(d, vision_width, device=device)
    tensors = {"ctx": ctx, "proj_weight": proj.weight.detach(), "proj_bias": proj.bias.detach()}
    for i in range(1, shape.depth):
        tensors[f"deep_text_{i}"] = torch.randn(m, d, device=device) * config.init_std
    for i in range(1, shape.depth):
        tensors[f"coupling_{i}_weight"] = coupling.weight.detach().clone()
        tensors[f"coupling_{i}_bias"] = coupling.bias.detach().clone()
    return tensors, frozen
