from __future__ import annotations

from torch import nn

from ...prompting import ContextPromptTuner
from .config import CoOpConfig
from .layer import CoOpLayer


class CoOpModel(ContextPromptTuner):
    """CoOp on a Hugging Face `CLIPModel`/`CLIPTextModel` (or `SiglipModel`/`SiglipTextModel`, where the context
    starts at position 0: "X X X X {class}. </s>" padded to max_length): `get_peft_model(clip, CoOpConfig(...))`.

    Feed text in placeholder format ("[BOS] X X X X {class}. [EOS]", see `peft_effadapt.CLIPZeroShotClassifier`);
    the context replaces the placeholders. Saved: `coop_ctx` only. `merge_and_unload` (unified context) returns a
    plain CLIP model whose position embeddings carry the context.
    """

    prefix: str = "coop_"
    tuner_layer_cls = CoOpLayer
    method_name = "CoOp"

    def _new_layer(self, target: nn.Module, adapter_name: str, config: CoOpConfig) -> CoOpLayer:
        return CoOpLayer(target, adapter_name, config)
