from __future__ import annotations

import torch
from torch import nn

from ...prompting import ContextPromptLayer, PromptSlots
from ...prompting.init import adapter_device, initial_context, perturbed
from .config import CoCoOpConfig


class CoCoOpLayer(ContextPromptLayer):
    """CLIP text embeddings plus, per adapter, the context `cocoop_ctx` (n x d) and the meta-net π =
    `cocoop_meta_up` ∘ ReLU ∘ `cocoop_meta_down` (two Linears, PyTorch's default initialisation as the reference's).

    Without a row shift the layer writes the plain context (π = 0, e.g. for text-only calls); with one, each text row
    gets ctx + its image's shift. The hooks of `conditioning.py` set the shifts during a `CLIPModel` call with images
    and class prompts: `open_conditioned_call`, `shift_rows` (from the image features), `close_conditioned_call`.
    """

    adapter_layer_names = ("cocoop_ctx", "cocoop_meta_down", "cocoop_meta_up")
    other_param_names = ("cocoop_slots",)
    image_conditioned = True

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: CoCoOpConfig, image_width: int) -> None:
        super().__init__(base_layer)
        self.cocoop_ctx = nn.ParameterDict({})
        self.cocoop_meta_down = nn.ModuleDict({})
        self.cocoop_meta_up = nn.ModuleDict({})
        self.cocoop_slots: dict[str, PromptSlots] = {}
        self.image_width = image_width
        self._row_shift: torch.Tensor | None = None
        self._classes: int | None = None  # prompts per image of the open conditioned call
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: CoCoOpConfig, inference_mode: bool = False) -> None:
        tok = self.token_embedding.weight
        n, d = config.n_ctx, tok.shape[1]
        device = adapter_device(tok)
        with torch.no_grad():
            ctx = perturbed(initial_context(tok, config, (n, d)), config)
            hidden = config.meta_net_hidden or max(1, self.image_width // 16)
            down, up = nn.Linear(self.image_width, hidden, device=device), nn.Linear(hidden, d, device=device)
            for param in [*down.parameters(), *up.parameters()]:
                param.copy_(perturbed(param, config))
        self.cocoop_ctx[adapter_name] = nn.Parameter(ctx.float())
        self.cocoop_meta_down[adapter_name] = down.float()
        self.cocoop_meta_up[adapter_name] = up.float()
        self.cocoop_slots[adapter_name] = config.prompt_slots()
        self._move_to_base_device(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def has_adapter(self, adapter_name: str) -> bool:
        return adapter_name in self.cocoop_ctx

    def slots(self, adapter_name: str) -> PromptSlots:
        return self.cocoop_slots[adapter_name]

    def conditioned_adapter(self) -> str | None:
        """The active CoCoOp adapter when the layer is enabled, else None."""
        return None if self.disable_adapters else self._active_prompt_adapter()

    def shift(self, adapter_name: str, image_features: torch.Tensor) -> torch.Tensor:
        """π(v̂): one d-vector per (normalised) image feature."""
        down, up = self.cocoop_meta_down[adapter_name], self.cocoop_meta_up[adapter_name]
        return up(nn.functional.relu(down(image_features.to(down.weight.dtype))))

    def open_conditioned_call(self, classes: int) -> None:
        """A CLIP call over `classes` prompts per image begins: its image features will shift the context."""
        self._classes = classes

    def shift_rows(self, image_features: torch.Tensor) -> None:
        """Inside a conditioned call, text row i gets ctx + π(v̂) of its image (rows = images x classes,
        image-major); outside one, nothing."""
        if self._classes is not None:
            shift = self.shift(self.conditioned_adapter(), image_features)
            self._row_shift = shift.repeat_interleave(self._classes, dim=0)

    def close_conditioned_call(self) -> int | None:
        """Ends the conditioned call (if one is open); returns its prompts per image."""
        classes, self._classes, self._row_shift = self._classes, None, None
        return classes

    def context(self, adapter_name: str) -> torch.Tensor:
        ctx = self.cocoop_ctx[adapter_name]
        if self._row_shift is None:
            if self._classes is not None:
                raise ValueError(
                    "CoCoOp: the CLIP forward ran its text tower before projecting the images, so the prompts cannot "
                    "be conditioned on them (CoCoOp relies on CLIPModel.forward computing image features first).")
            return ctx
        return ctx.unsqueeze(0) + self._row_shift.to(ctx.dtype).unsqueeze(1)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        names = adapter_names or [n for n in self.active_adapters if self.has_adapter(n)]
        if any(self.has_adapter(n) for n in names):
            raise ValueError(
                f"CoCoOp adapter '{names[0]}' conditions the prompt on each image, so it has no image-independent form "
                "to merge into CLIP's weights. Keep the adapter unmerged."
            )
