from __future__ import annotations

import torch
from torch import nn

from ...prompting import ContextPromptTuner
from .config import RLPConfig
from .layer import RLPLayer


class RLPModel(ContextPromptTuner):
    """RLP on a Hugging Face `CLIPModel`/`CLIPTextModel` (or `SiglipModel`/`SiglipTextModel`, context from position 0
    in SigLIP's layout "X X X X {class}. </s>" padded to max_length): `get_peft_model(clip, RLPConfig(...))`.

    Feed text in placeholder format ("[BOS] X X X X {class}. [EOS]", e.g. through
    `peft_effadapt.CLIPZeroShotClassifier`); the prompt F + Drop(A @ B) replaces the placeholders. Saved: `rlp_A`,
    `rlp_B` only. `merge_and_unload` (unified context) returns a plain CLIP model with identical logits on the
    placeholder prompts.
    """

    prefix: str = "rlp_"
    tuner_layer_cls = RLPLayer
    method_name = "RLP"

    def _validate(self, config: RLPConfig, embed_dim: int) -> None:
        if config.rank > min(config.n_ctx, embed_dim):
            raise ValueError(
                f"rank={config.rank} exceeds min(n_ctx={config.n_ctx}, d={embed_dim}); the rank of an n x d prompt "
                "cannot be larger."
            )

    def _new_layer(self, target: nn.Module, adapter_name: str, config: RLPConfig) -> RLPLayer:
        return RLPLayer(target, adapter_name, config)

    def prompt_matrix(self, adapter_name: str | None = None) -> torch.Tensor:
        """P* = F + A @ B of an adapter (the active one by default)."""
        return self.prompt_layer().prompt_matrix(adapter_name)
