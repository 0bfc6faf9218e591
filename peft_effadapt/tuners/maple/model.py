from __future__ import annotations

from torch import nn

from ...prompting.deep import DeepPromptTuner
from .config import MaPLeConfig
from .layer import MaPLeLayer


class MaPLeModel(DeepPromptTuner):
    """MaPLe on a Hugging Face `CLIPModel`: `get_peft_model(clip, MaPLeConfig(...))`.

    Feed text in placeholder format ("[BOS] X X X X {class}. [EOS]", e.g. through
    `peft_effadapt.CLIPZeroShotClassifier`): the context (learned + fixed words) replaces the placeholders, deep text
    prompts and coupled visual prompts are written by hooks on both encoders. Saved: `maple_prompts` only. Not
    mergeable (the visual prompts change the image encoder); `unload` returns the untouched CLIP. SigLIP is refused:
    its vision tower pools every token through an attention head (no class token), so appended visual prompts would
    enter the image feature.
    """

    prefix: str = "maple_"
    tuner_layer_cls = MaPLeLayer
    method_name = "MaPLe"

    def _new_layer(self, target: nn.Module, adapter_name: str, config: MaPLeConfig) -> MaPLeLayer:
        return MaPLeLayer(target, adapter_name, config, vision_width=self._vision_width())
