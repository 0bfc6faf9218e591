"""Per-forward token state of the merging layers, and the per-layer merge settings.

Per-forward state (token sizes, optional source map) lives in a `MergeContext`: a forward pre-hook on the backbone
resets it, layer l reads its input state from slot l and writes slot l+1, and never touches earlier slots, so a
layer re-run by gradient checkpointing sees exactly the inputs of its first run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class TokenState:
    """What layer l receives with its hidden states: the token count, sizes (B×N×1 or None = all ones) and the
    source map (B×N×N_0 or None = identity / not traced)."""

    num_tokens: int | None = None
    size: torch.Tensor | None = None
    source: torch.Tensor | None = None


@dataclass
class MergeContext:
    """Slots of token state for one forward: slot l is the input of layer l."""

    slots: dict[int, TokenState] = field(default_factory=lambda: {0: TokenState()})

    def reset(self) -> None:
        self.slots = {0: TokenState()}

    def read(self, layer: int, hidden_states: torch.Tensor, layer_name: str) -> TokenState:
        state = self.slots.get(layer)
        if state is None:
            if layer == 0 or not any(k > 0 for k in self.slots):
                return TokenState()  # nothing has been merged before this layer in this forward
            raise ValueError(
                f"token-merging layer {layer} ({layer_name}) ran without the state of layer {layer - 1}; merging "
                "layers must run in order inside one forward of the model."
            )
        if state.num_tokens is not None and state.num_tokens != hidden_states.shape[1]:
            raise ValueError(
                f"token-merging layer {layer} ({layer_name}) received {hidden_states.shape[1]} tokens, but the merge "
                f"state of this forward says {state.num_tokens}. Run the layers through the model's forward (the "
                "state is reset by a hook on the backbone); with gradient checkpointing, run backward before the next "
                "forward."
            )
        return state

    def write(self, layer: int, state: TokenState) -> None:
        self.slots[layer] = state

    def final(self) -> TokenState:
        return self.slots[max(self.slots)]

    def token_counts(self) -> list[int | None]:
        return [self.slots[k].num_tokens for k in sorted(self.slots)]


class ResetMergeState:
    """Forward pre-hook of the backbone: a fresh state for every forward. A callable object (not a closure) so that
    deep-copying the model copies the hook together with the context its layers use."""

    def __init__(self, context: MergeContext):
        self.context = context

    def __call__(self, module, args):
        self.context.reset()


@dataclass(frozen=True)
class MergeSettings:
    """Per adapter and layer: how many tokens to merge and how."""

    r: int
    protected: int = 1
    prop_attn: bool = True
    trace_source: bool = False
    clamp: bool = False  # False: r above the 50 % rule raises; True: clamp like the reference ToMe
    method: str = "ToMe"
