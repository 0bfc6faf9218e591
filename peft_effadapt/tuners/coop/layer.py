from __future__ import annotations

import torch
from torch import nn

from ...prompting import ContextPromptLayer, PromptSlots
from ...prompting.init import initial_context, perturbed
from .config import CoOpConfig


class CoOpLayer(ContextPromptLayer):
    """CLIP text embeddings plus, per adapter, a learnable context `coop_ctx` of shape (n, d) or (C, n, d)."""

    adapter_layer_names = ("coop_ctx",)
    other_param_names = ("coop_slots",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: CoOpConfig) -> None:
        super().__init__(base_layer)
        self.coop_ctx = nn.ParameterDict({})
        self.coop_slots: dict[str, PromptSlots] = {}
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: CoOpConfig, inference_mode: bool = False) -> None:
        tok = self.token_embedding.weight
        n, d = config.n_ctx, tok.shape[1]
        shape = (config.num_classes, n, d) if config.csc else (n, d)
        with torch.no_grad():
            ctx = perturbed(initial_context(tok, config, shape), config)
        self.coop_ctx[adapter_name] = nn.Parameter(ctx.float())
        self.coop_slots[adapter_name] = config.prompt_slots()
        self._move_to_base_device(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def has_adapter(self, adapter_name: str) -> bool:
        return adapter_name in self.coop_ctx

    def slots(self, adapter_name: str) -> PromptSlots:
        return self.coop_slots[adapter_name]

    def context(self, adapter_name: str) -> torch.Tensor:
        return self.coop_ctx[adapter_name]
