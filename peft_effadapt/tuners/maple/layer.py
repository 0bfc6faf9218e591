from __future__ import annotations

import torch
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from ...prompting import PromptSlots
from ...prompting.config import DeepPromptShape
from ...prompting.deep import DeepPromptLayer
from ...prompting.init import maple_prompt, perturbed
from .config import MaPLeConfig


class MaPLeLayer(DeepPromptLayer):
    """CLIP text embeddings plus, per adapter, `maple_prompts` (the learned context, projection, deep text prompts
    and couplings, read by the deep-prompt hooks) and the non-persistent fixed text rows `maple_fixed` (rebuilt from
    the vocabulary, never saved)."""

    adapter_layer_names = ("maple_prompts",)
    other_param_names = ("maple_fixed", "maple_shape", "maple_slots")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: MaPLeConfig, vision_width: int) -> None:
        super().__init__(base_layer, vision_width)
        self.maple_prompts = nn.ModuleDict({})
        self.maple_fixed = BufferDict({}, persistent=False)
        self.maple_shape: dict[str, DeepPromptShape] = {}
        self.maple_slots: dict[str, PromptSlots] = {}
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: MaPLeConfig, inference_mode: bool = False) -> None:
        tensors, fixed = maple_prompt(self.token_embedding.weight, config, self.vision_width)
        self.maple_prompts[adapter_name] = nn.ParameterDict(
            {k: nn.Parameter(perturbed(v, config).float()) for k, v in tensors.items()})
        self.maple_fixed[adapter_name] = fixed.float()
        self.maple_shape[adapter_name] = config.deep_shape()
        self.maple_slots[adapter_name] = config.prompt_slots()
        self._move_to_base_device(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def has_adapter(self, adapter_name: str) -> bool:
        return adapter_name in self.maple_prompts

    def slots(self, adapter_name: str) -> PromptSlots:
        return self.maple_slots[adapter_name]

    def deep_shape(self, adapter_name: str) -> DeepPromptShape:
        return self.maple_shape[adapter_name]

    def deep_value(self, adapter_name: str, key: str) -> torch.Tensor:
        return self.maple_prompts[adapter_name][key]

    def context(self, adapter_name: str) -> torch.Tensor:
        """[learned ctx (m x d); fixed words (n - m x d)], written at the n placeholders."""
        return torch.cat([self.deep_value(adapter_name, "ctx"), self.maple_fixed[adapter_name]], dim=0)
