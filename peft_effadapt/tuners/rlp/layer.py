from __future__ import annotations

from dataclasses import dataclass

import torch
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from ...prompting import ContextPromptLayer, PromptSlots
from ...prompting.init import low_rank_prompt
from .config import RLPConfig


@dataclass(frozen=True)
class RLPSettings:
    slots: PromptSlots
    rank: int
    dropout: float
    dropout_mode: str


def low_rank_dropout(delta: torch.Tensor, p: float, mode: str, training: bool) -> torch.Tensor:
    """Dropout on the low-rank path only (never on the frozen path); the identity in eval or with p = 0."""
    if not training or p == 0.0:
        return delta
    if mode == "element":
        return nn.functional.dropout(delta, p, training=True)
    keep = torch.rand((), device=delta.device) >= p  # 'branch': the whole delta is kept or dropped
    return delta * keep.to(delta.dtype) / (1.0 - p)


class RLPLayer(ContextPromptLayer):
    """CLIP text embeddings plus, per adapter, the low-rank factors `rlp_A` (n x r), `rlp_B` (r x d) and the frozen
    path `rlp_frozen` (n x d, rebuilt from the vocabulary, never saved). Class-specific context adds a leading C."""

    adapter_layer_names = ("rlp_A", "rlp_B")
    other_param_names = ("rlp_frozen", "rlp_settings")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: RLPConfig) -> None:
        super().__init__(base_layer)
        self.rlp_A = nn.ParameterDict({})
        self.rlp_B = nn.ParameterDict({})
        self.rlp_frozen = BufferDict({}, persistent=False)
        self.rlp_settings: dict[str, RLPSettings] = {}
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: RLPConfig, inference_mode: bool = False) -> None:
        n, r, d = config.n_ctx, config.rank, self.embed_dim
        with torch.no_grad():
            frozen, a, b = low_rank_prompt(self.token_embedding.weight, config, r, config.init, config.use_init_path)
            if not config.init_weights:
                a, b = torch.randn(n, r, device=a.device) * 0.5, torch.randn(r, d, device=b.device) * 0.5
            if config.csc:
                c = config.num_classes
                a, b = a.expand(c, n, r).clone(), b.expand(c, r, d).clone()
        self.rlp_A[adapter_name] = nn.Parameter(a.float().contiguous())
        self.rlp_B[adapter_name] = nn.Parameter(b.float().contiguous())
        self.rlp_frozen[adapter_name] = frozen.float()
        self.rlp_settings[adapter_name] = RLPSettings(
            config.prompt_slots(),
            r, float(config.lowrank_dropout), config.dropout_mode,
        )
        self._move_to_base_device(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def has_adapter(self, adapter_name: str) -> bool:
        return adapter_name in self.rlp_A

    def slots(self, adapter_name: str) -> PromptSlots:
        return self.rlp_settings[adapter_name].slots

    def low_rank_delta(self, adapter_name: str) -> torch.Tensor:
        """A @ B: (n, d) or (C, n, d)."""
        return self.rlp_A[adapter_name] @ self.rlp_B[adapter_name]

    def frozen_path(self, adapter_name: str) -> torch.Tensor:
        return self.rlp_frozen[adapter_name]

    def context(self, adapter_name: str) -> torch.Tensor:
        """Training form F + Drop(A @ B) in train mode; in eval the collapsed form P* = F + A @ B."""
        settings = self.rlp_settings[adapter_name]
        delta = low_rank_dropout(self.low_rank_delta(adapter_name), settings.dropout, settings.dropout_mode,
                                 self.training)
        return self.frozen_path(adapter_name) + delta

    def prompt_matrix(self, adapter_name: str | None = None) -> torch.Tensor:
        """The collapsed prompt P* = F + A @ B (detached), for inspection or export."""
        name = adapter_name or self._active_prompt_adapter()
        with torch.no_grad():
            return (self.frozen_path(name) + self.low_rank_delta(name)).detach().clone()
