"""The text-prompt layer: wraps `CLIPTextEmbeddings` (or `SiglipTextEmbeddings`) and writes context rows at the
placeholder positions.

For a text row in prompt format (`input_ids[s:s+n] == placeholder`, s = 1 after CLIP's BOS, 0 for SigLIP), the token
embeddings at positions s..s+n-1 are replaced by the adapter's context; the model's own embeddings module then adds
the positional embeddings. `input_ids` pass through unchanged, so the causal mask and the EOS pooling index of
`CLIPTextModel` (SigLIP: last-position pooling) are those of the placeholder prompt. Rows not in prompt format are
left untouched.

Merging (unified context only): replacing `tok[X]` by `ctx_p` at position p equals adding `ctx_p - tok[X]` to row
p of `position_embedding`, which is what `merge` does (exact for prompt-format rows; it also shifts every other text
at those positions, so a merged model is meant for the placeholder prompts). Class-specific context has no such
form and `merge` refuses it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ..validation.inputs import require


@dataclass(frozen=True)
class PromptSlots:
    """Where one adapter writes: n context rows from position `start` (1: after CLIP's BOS, 0: SigLIP), in rows
    whose ids there equal the placeholder."""

    n_ctx: int
    placeholder_id: int
    num_classes: int | None = None  # set for class-specific context
    start: int = 1

    @property
    def positions(self) -> slice:
        return slice(self.start, self.start + self.n_ctx)

    @property
    def unified(self) -> bool:
        return self.num_classes is None


def prompt_rows(input_ids: torch.Tensor, slots: PromptSlots) -> torch.Tensor:
    """Bool per row: the row holds the placeholder at every context position start..start+n-1."""
    if input_ids.shape[-1] < slots.start + slots.n_ctx:
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    return (input_ids[:, slots.positions] == slots.placeholder_id).all(dim=1)


def write_context(embeds: torch.Tensor, input_ids: torch.Tensor, context: torch.Tensor,
                  slots: PromptSlots) -> torch.Tensor:
    """Token embeddings with context rows start..start+n-1 of every prompt-format row replaced by `context` ((n, d), or (C, n, d) for
    class-specific context, where the batch must be the C class prompts in class order)."""
    rows = prompt_rows(input_ids, slots)
    batch, start, end = embeds.shape[0], slots.start, slots.start + slots.n_ctx
    if end > embeds.shape[1]:
        return embeds  # too short to hold the context: no row is in prompt format
    context = context.to(embeds.dtype)
    if context.dim() == 2:
        context = context.unsqueeze(0).expand(batch, -1, -1)
    else:
        check_all_rows(rows, context.shape[0], batch)
    # No data-dependent early exit for batches without prompt rows: `where` keeps their embeddings bit for bit, and
    # the forward stays one graph under torch.compile.
    mixed = torch.where(rows[:, None, None], context, embeds[:, start:end])
    return torch.cat([embeds[:, :start], mixed, embeds[:, end:]], dim=1)


def check_all_rows(rows: torch.Tensor, num_contexts: int, batch: int) -> None:
    """Per-row context (class-specific, or CoCoOp's per-image shift) needs all text rows in prompt format or none
    (`validation.require`: a ValueError eagerly, an in-graph assert under torch.compile)."""
    if num_contexts != batch:
        raise ValueError(
            f"class-specific context holds {num_contexts} class contexts, so the text batch must be the "
            f"{num_contexts} class prompts in class order; got {batch} rows."
        )
    message = (f"class-specific context holds {num_contexts} class contexts, so the text batch must be the "
               f"{num_contexts} class prompts in class order, all in placeholder format (or none of them)")
    # a batch without prompt rows passes through untouched
    require(rows.all() | ~rows.any(), message, lambda: f"; {int(rows.sum())} of {batch} are.")


class ContextPromptLayer(nn.Module, BaseTunerLayer):
    """Base layer around a `CLIPTextEmbeddings` or `SiglipTextEmbeddings`. Subclasses own the adapter containers (named with their method
    prefix) and implement `slots(name)`, `context(name)` and `has_adapter(name)`."""

    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self._disable_adapters = False
        self.merged_adapters = []
        self._merged_rows: dict[str, tuple[slice, torch.Tensor]] = {}
        self._model_hooks: list = []  # handles of the hooks this layer's method keeps on other modules of the model

    # -- to implement ---------------------------------------------------------------------------------------------
    def has_adapter(self, adapter_name: str) -> bool:
        raise NotImplementedError

    def slots(self, adapter_name: str) -> PromptSlots:
        raise NotImplementedError

    def context(self, adapter_name: str) -> torch.Tensor:
        """The prompt fed to CLIP: (n, d) or (C, n, d), honouring train/eval mode (dropout etc.)."""
        raise NotImplementedError

    # -- helpers --------------------------------------------------------------------------------------------------
    @property
    def token_embedding(self) -> nn.Embedding:
        return self.get_base_layer().token_embedding

    @property
    def position_embedding(self) -> nn.Embedding:
        return self.get_base_layer().position_embedding

    @property
    def embed_dim(self) -> int:
        return self.token_embedding.weight.shape[1]

    def _move_to_base_device(self, adapter_name: str) -> None:
        """Moves the adapter to the device of the embeddings, keeping its own (fp32) dtype (spec pitfall 7)."""
        device = self.token_embedding.weight.device
        if device.type == "meta":
            return
        for attr in self.adapter_layer_names + self.other_param_names:
            container = getattr(self, attr, None)
            if isinstance(container, (nn.ParameterDict, nn.ModuleDict)) or type(container).__name__ == "BufferDict":  # noqa: SIM102
                if adapter_name in container and not any(
                    p.device.type == "meta" for p in ([container[adapter_name]] if torch.is_tensor(
                        container[adapter_name]) else container[adapter_name].parameters())
                ):
                    container[adapter_name] = container[adapter_name].to(device)

    def attach_hooks(self, register: Callable[[ContextPromptLayer, nn.Module], list], model: nn.Module) -> None:
        """Hooks other modules of `model` for this layer once: `register(self, model)` registers hook objects bound
        to this layer (so a deep copy of the model is hooked to the copy's layer) and returns their handles."""
        if not self._model_hooks:
            self._model_hooks = register(self, model)

    def detach_hooks(self) -> None:
        """Removes the hooks `attach_hooks` registered."""
        for handle in self._model_hooks:
            handle.remove()
        self._model_hooks = []

    def _active_prompt_adapter(self) -> str | None:
        active = [name for name in self.active_adapters if self.has_adapter(name)]
        if len(active) > 1:
            raise ValueError(
                f"Only one prompt adapter can be active at a time (they write the same positions); active: {active}."
            )
        return active[0] if active else None

    # -- forward --------------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        base = self.get_base_layer()
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return base(input_ids=input_ids, position_ids=position_ids, inputs_embeds=inputs_embeds)
        name = None if self.merged or input_ids is None or inputs_embeds is not None else self._active_prompt_adapter()
        if name is None:
            return base(input_ids=input_ids, position_ids=position_ids, inputs_embeds=inputs_embeds)
        embeds = write_context(self.token_embedding(input_ids), input_ids, self.context(name), self.slots(name))
        return base(input_ids=input_ids, position_ids=position_ids, inputs_embeds=embeds)

    # -- merging --------------------------------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = [n for n in check_adapters_to_merge(self, adapter_names) if self.has_adapter(n)]
        if not adapter_names:
            return
        if len(adapter_names) + len(self.merged_adapters) > 1:
            raise ValueError(
                f"Cannot merge prompt adapters {self.merged_adapters + adapter_names} together: each one replaces "
                "the same context positions. Merge one."
            )
        name = adapter_names[0]
        slots = self.slots(name)
        if not slots.unified:
            raise ValueError(
                f"Prompt adapter '{name}' uses a class-specific context ({slots.num_classes} classes), which cannot "
                "be merged into the embedding tables (the position embedding is shared by all classes). Keep the "
                "adapter unmerged, or cache the class text features instead."
            )
        was_training = self.training
        self.eval()  # the collapsed form: dropout is the identity
        try:
            with torch.no_grad():
                ctx = self.context(name).detach().float()
        finally:
            self.train(was_training)
        weight = self.position_embedding.weight
        rows = slots.positions
        if weight.shape[0] < rows.stop:
            raise ValueError(f"the text tower has {weight.shape[0]} positions, fewer than start {slots.start} + "
                             f"n_ctx={slots.n_ctx}.")
        with torch.no_grad():
            placeholder = self.token_embedding.weight[slots.placeholder_id].float()
            original = weight.data[rows].clone()
            new_rows = original.float() + (ctx - placeholder).to(weight.device)
            if safe_merge and not torch.isfinite(new_rows).all():
                raise ValueError(f"NaNs or infs detected while merging prompt adapter '{name}'; not merged.")
            weight.data[rows] = new_rows.to(weight.dtype)
        self._merged_rows[name] = (rows, original)
        self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        weight = self.position_embedding.weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            rows, original = self._merged_rows.pop(name)
            with torch.no_grad():
                weight.data[rows] = original.to(weight.device)  # exact restore, no round-off
