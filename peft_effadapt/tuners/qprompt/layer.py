"""The QPrompt layer: CLIP text embeddings whose placeholder rows receive the (quantised) prompt of the host."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from ...prompting import PromptSlots
from ...prompting.config import DeepPromptShape
from ...prompting.deep import DeepPromptLayer
from ...prompting.init import adapter_device, initial_context, low_rank_prompt, maple_prompt, perturbed
from .config import QPromptConfig
from .tensors import QuantizedTensors


@dataclass(frozen=True)
class QPromptSettings:
    slots: PromptSlots
    host: str
    rlp_dropout: float = 0.0
    deep: DeepPromptShape | None = None  # the MaPLe host's deep prompts


def host_tensors(config: QPromptConfig, tok: torch.Tensor, vision_width: int | None) -> tuple[dict, torch.Tensor]:
    """(latent tensors by name, frozen rows) of a new adapter, initialised as the host method does. Frozen rows: RLP's
    P0, MaPLe's fixed text tokens (none for CoOp)."""
    if config.host == "coop":
        tensors = {"ctx": initial_context(tok, config, (config.n_ctx, tok.shape[1]))}
        frozen = torch.zeros(0, tok.shape[1], device=adapter_device(tok))
    elif config.host == "rlp":
        frozen, a, b = low_rank_prompt(tok, config, config.rlp_rank)
        tensors = {"A": a, "B": b}
    else:
        if vision_width is None:
            raise ValueError("host='maple' needs a CLIPModel (text and vision towers); the model has no vision tower.")
        tensors, frozen = maple_prompt(tok, config, vision_width)
    return {k: perturbed(v, config) for k, v in tensors.items()}, frozen


class QPromptLayer(DeepPromptLayer):
    """CLIP text embeddings plus, per adapter, `qprompt_params` (the latent tensors of the host prompt, quantised in
    every forward) and the non-persistent frozen rows `qprompt_frozen` (rebuilt from the vocabulary, never saved)."""

    adapter_layer_names = ("qprompt_params",)
    other_param_names = ("qprompt_frozen", "qprompt_settings")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: QPromptConfig,
                 vision_width: int | None = None) -> None:
        super().__init__(base_layer, vision_width)
        self.qprompt_params = nn.ModuleDict({})
        self.qprompt_frozen = BufferDict({}, persistent=False)
        self.qprompt_settings: dict[str, QPromptSettings] = {}
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: QPromptConfig, inference_mode: bool = False) -> None:
        tok = self.token_embedding.weight
        tensors, frozen = host_tensors(config, tok, self.vision_width)
        self.qprompt_params[adapter_name] = QuantizedTensors(tensors, config, config.host)
        self.qprompt_frozen[adapter_name] = frozen.float()
        self.qprompt_settings[adapter_name] = QPromptSettings(
            config.prompt_slots(), config.host, float(config.rlp_dropout), config.deep_shape())
        self._move_to_base_device(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def has_adapter(self, adapter_name: str) -> bool:
        return adapter_name in self.qprompt_params

    def slots(self, adapter_name: str) -> PromptSlots:
        return self.qprompt_settings[adapter_name].slots

    def tensors(self, adapter_name: str) -> QuantizedTensors:
        return self.qprompt_params[adapter_name]

    def value(self, adapter_name: str, name: str) -> torch.Tensor:
        return self.qprompt_params[adapter_name].value(name, self.training)

    def context(self, adapter_name: str) -> torch.Tensor:
        """The n x d prompt written at the placeholders: CoOp Q(ctx); RLP P0 + Drop(Q(A) @ Q(B)) (the quantised
        low-rank factors, collapsed in eval); MaPLe [Q(ctx); fixed rows]."""
        host = self.qprompt_settings[adapter_name].host
        if host == "coop":
            return self.value(adapter_name, "ctx")
        frozen = self.qprompt_frozen[adapter_name]
        if host == "rlp":
            delta = self.value(adapter_name, "A") @ self.value(adapter_name, "B")
            delta = nn.functional.dropout(delta, self.qprompt_settings[adapter_name].rlp_dropout, self.training)
            return frozen + delta
        return torch.cat([self.value(adapter_name, "ctx"), frozen], dim=0)

    def prompt_matrix(self, adapter_name: str | None = None) -> torch.Tensor:
        """The prompt as deployed (eval form, detached)."""
        name = adapter_name or self._active_prompt_adapter()
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                return self.context(name).detach().clone()
        finally:
            self.train(was_training)

    # -- MaPLe host: what the deep-prompt hooks read -----------------------------------------------------------
    def deep_shape(self, adapter_name: str) -> DeepPromptShape | None:
        return self.qprompt_settings[adapter_name].deep

    def deep_value(self, adapter_name: str, key: str) -> torch.Tensor:
        return self.value(adapter_name, key)
