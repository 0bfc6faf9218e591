from __future__ import annotations

import types

import torch
from torch import nn
from transformers import CLIPModel
from transformers.models.clip.modeling_clip import CLIPOutput

from ...prompting import ContextPromptTuner
from .config import CoCoOpConfig
from .layer import CoCoOpLayer


def _pooled(output) -> torch.Tensor:
    return output if torch.is_tensor(output) else output.pooler_output


def conditioned_clip_forward(clip: CLIPModel, *args, **kwargs):
    """`CLIPModel.forward` with CoCoOp's per-image prompts while a CoCoOp adapter is active, else the plain forward.

    Bound to the CLIP instance as its `forward` by `CoCoOpModel` (peft's `PeftModel.forward` calls the base model
    directly), removed again by `unload`."""
    plain = type(clip).forward
    layer = next((m for m in clip.modules() if isinstance(m, CoCoOpLayer)), None)
    name = layer.conditioned_adapter() if layer is not None else None
    pixel_values, input_ids = kwargs.get("pixel_values"), kwargs.get("input_ids")
    if name is None or args or pixel_values is None or input_ids is None:
        return plain(clip, *args, **kwargs)
    if kwargs.get("return_loss"):
        raise ValueError("CoCoOp gives per-image class logits; CLIP's contrastive loss (return_loss=True) does not "
                         "apply. Use a cross-entropy on logits_per_image (e.g. peft_effadapt.CLIPZeroShotClassifier).")
    image = nn.functional.normalize(_pooled(clip.get_image_features(pixel_values=pixel_values)), dim=-1)
    images, classes = image.shape[0], input_ids.shape[0]
    mask = kwargs.get("attention_mask")
    layer.set_row_shift(layer.shift(name, image).repeat_interleave(classes, dim=0))
    try:  # not a `with` block: torch.compile cannot trace a generator context manager (a graph break)
        text = _pooled(clip.get_text_features(
            input_ids=input_ids.repeat(images, 1),
            attention_mask=mask.repeat(images, 1) if mask is not None else None))
    finally:
        layer.set_row_shift(None)
    text = nn.functional.normalize(text, dim=-1).view(images, classes, -1)
    logits = clip.logit_scale.exp().to(image.dtype) * torch.einsum("bp,bcp->bc", image, text.to(image.dtype))
    return CLIPOutput(logits_per_image=logits, logits_per_text=logits.t(), text_embeds=text, image_embeds=image)


class CoCoOpModel(ContextPromptTuner):
    """CoCoOp on a Hugging Face `CLIPModel`: `get_peft_model(clip, CoCoOpConfig(...))`.

    `model(input_ids=<C class prompts in placeholder format>, pixel_values=<B images>)` encodes the images, shifts
    the context per image by the meta-net, runs the text tower on the B x C prompts and returns a `CLIPOutput` with
    `logits_per_image` (B x C, exp(logit_scale) * cos), `text_embeds` (B x C x p) and `image_embeds` (B x p). Calls
    without images (`get_text_features`) use the unshifted context. Saved: `cocoop_ctx` and the meta-net
    (`cocoop_meta_down`, `cocoop_meta_up`). Not mergeable.
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
        self._route_forward(model)

    def _new_layer(self, target: nn.Module, adapter_name: str, config: CoCoOpConfig) -> CoCoOpLayer:
        return CoCoOpLayer(target, adapter_name, config, image_width=self._image_width())

    def _route_forward(self, model: nn.Module) -> None:
        if "forward" not in vars(model):
            model.forward = types.MethodType(conditioned_clip_forward, model)

    def _unload_and_optionally_merge(self, *args, **kwargs):
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        vars(model).pop("forward", None)
        return model
