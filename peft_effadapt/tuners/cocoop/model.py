from __future__ import annotations

from torch import nn
from transformers import CLIPModel

from ...prompting import ContextPromptTuner
from .conditioning import conditioning_hooks
from .config import CoCoOpConfig
from .layer import CoCoOpLayer


class CoCoOpModel(ContextPromptTuner):
    """CoCoOp on a Hugging Face `CLIPModel`: `get_peft_model(clip, CoCoOpConfig(...))`.

    `model(input_ids=<C class prompts in placeholder format>, pixel_values=<B images>)` encodes the images, shifts
    the context per image by the meta-net, runs the text tower on the B x C prompts and returns a `CLIPOutput` with
    `logits_per_image` (B x C, exp(logit_scale) * cos), `text_embeds` (B x C x p) and `image_embeds` (B x p). Calls
    without images (`get_text_features`) use the unshifted context. Saved: `cocoop_ctx` and the meta-net
    (`cocoop_meta_down`, `cocoop_meta_up`). Not mergeable.

    peft's `PeftModel.forward` calls the CLIP model itself, so the per-image forward is CLIP's own forward steered by
    hooks bound to the prompt layer (`conditioning.py`); `unload` removes them.
    """

    prefix: str = "cocoop_"
    tuner_layer_cls = CoCoOpLayer
    method_name = "CoCoOp"

    def _image_width(self) -> int:
        return self.model.config.projection_dim

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        if not isinstance(model, CLIPModel):
            raise ValueError(
                f"CoCoOp conditions the text prompt on image features, so it needs a CLIPModel (both towers; "
                f"subclasses accepted); got {type(model).__name__}. SiglipModel is not supported: CoCoOp's "
                f"conditioned forward builds CLIP's softmax head (exp(scale) * cos, no SigLIP bias or sigmoid loss)."
            )
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        self.prompt_layer().attach_hooks(conditioning_hooks, model)

    def _new_layer(self, target: nn.Module, adapter_name: str, config: CoCoOpConfig) -> CoCoOpLayer:
        return CoCoOpLayer(target, adapter_name, config, image_width=self._image_width())
