from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from ...peft_hooks import refusing_damaged_weights
from ...prompting.deep import DeepPromptTuner
from ...targeting import unwrap_to_tuner_layers
from .config import QPromptConfig
from .layer import QPromptLayer

PEFT_PREFIX = "base_model.model."


class QPromptModel(DeepPromptTuner):
    """QPrompt on a Hugging Face `CLIPModel` (`CLIPTextModel` for the CoOp/RLP hosts; `SiglipModel`/`SiglipTextModel`
    for the CoOp/RLP hosts in SigLIP's layout, the MaPLe host refuses SigLIP):
    `get_peft_model(clip, QPromptConfig(host="coop", bits=1, ...))`.

    Feed text in placeholder format ("[BOS] X X X X {class}. [EOS]", e.g. through
    `peft_effadapt.CLIPZeroShotClassifier`); the quantised prompt replaces the placeholders (and, for the MaPLe host,
    deep text/vision prompts are written by hooks). Saved: packed indices + fp16 codebook per quantised tensor (and
    the fp32 latents only with `save_latents=True`); loading rebuilds exactly the quantised prompt. CoOp/RLP hosts
    merge into the position embeddings like CoOp; a MaPLe host cannot be merged.
    """

    prefix: str = "qprompt_"
    tuner_layer_cls = QPromptLayer
    method_name = "QPrompt"

    # -- injection ------------------------------------------------------------------------------------------------
    def _validate(self, config: QPromptConfig, embed_dim: int) -> None:
        if config.host == "rlp" and config.rlp_rank > min(config.n_ctx, embed_dim):
            raise ValueError(f"rlp_rank={config.rlp_rank} exceeds min(n_ctx={config.n_ctx}, d={embed_dim}).")

    def _new_layer(self, target: nn.Module, adapter_name: str, config: QPromptConfig) -> QPromptLayer:
        return QPromptLayer(target, adapter_name, config, vision_width=self._vision_width())

    # -- inspection -----------------------------------------------------------------------------------------------
    def prompt_matrix(self, adapter_name: str | None = None) -> torch.Tensor:
        """The n x d text prompt as deployed (quantised, eval form) of an adapter (the active one by default)."""
        return self.prompt_layer().prompt_matrix(adapter_name)

    def refit_counts(self, adapter_name: str | None = None) -> dict[str, int]:
        """Codebook refits per quantised tensor since creation or loading (CAC; log them to compare runs)."""
        layer = self.prompt_layer()
        return layer.tensors(adapter_name or layer._active_prompt_adapter()).refits()

    # -- storage --------------------------------------------------------------------------------------------------
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """Replaces each quantised latent by '<name>_indices' (packed) and '<name>_codebook' (fp16)."""
        out = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        for layer_name, layer in unwrap_to_tuner_layers(model, QPromptLayer):
            if not layer.has_adapter(adapter_name):
                continue
            base = f"{layer_name}.qprompt_params.{adapter_name}."
            for key in [k for k in out if k.startswith(base)]:
                del out[key]
            encoded = layer.tensors(adapter_name).encode(save_latents=bool(getattr(config, "save_latents", False)))
            out.update({base + k: v for k, v in encoded.items()})
        return out

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Checks the stored tensors against the config (the layers decode them at their next use); on any mismatch
        raises before anything is loaded (`refusing_damaged_weights`)."""
        with refusing_damaged_weights(model, config, adapter_name):
            converted = cls._decode(model, adapter_name, state_dict)
        return BaseTuner._remap_adapter_state_dict_for_load.__func__(cls, model, config, adapter_name, converted)

    @classmethod
    def _decode(cls, model, adapter_name, state_dict):
        marker = ".qprompt_params."
        by_layer: dict[str, dict[str, torch.Tensor]] = {}
        key_prefix: dict[str, str] = {}
        for key, value in state_dict.items():
            if marker in key:
                layer_name, _, name = key.removeprefix(PEFT_PREFIX).partition(marker)
                by_layer.setdefault(layer_name, {})[name] = value
                key_prefix[layer_name] = key[: key.index(marker) + len(marker)]
            elif "." + cls.prefix in key or key.startswith(cls.prefix):
                raise ValueError(
                    f"The QPrompt adapter file holds {key!r}, which is no QPrompt tensor of this model (they live "
                    "under '<text embeddings>.qprompt_params.'). It belongs to another model or config."
                )
        latents: dict[str, torch.Tensor] = {}  # latents not saved by design, decoded so peft reports none missing
        for layer_name, layer in unwrap_to_tuner_layers(model, QPromptLayer):
            if not layer.has_adapter(adapter_name):
                continue
            layer_name = layer_name.removeprefix(PEFT_PREFIX)
            stored = by_layer.pop(layer_name, {})
            layer.tensors(adapter_name).check_stored(stored, layer_name)
            latents.update({key_prefix[layer_name] + name: value
                            for name, value in layer.tensors(adapter_name).decoded_latents(stored).items()})
        if by_layer:
            raise ValueError(
                f"The QPrompt adapter file has tensors for modules the model does not adapt: {sorted(by_layer)[:5]}. "
                "It belongs to another model or config."
            )
        return {**state_dict, **latents}
