"""CoCoOp's per-image forward of a Hugging Face `CLIPModel`, as three hooks bound to the `CoCoOpLayer`.

peft's `PeftModel.forward` calls the base model itself, so CoCoOp conditions CLIP's own forward through hooks
(small callable objects, no method bound to the CLIP instance; a deep copy of the model is hooked to its own layer):

1. `ConditionedCall`, forward pre-hook of the `CLIPModel`: a call with images and class prompts while a CoCoOp
   adapter is active repeats the C prompts once per image (B x C text rows, image-major) and opens the call;
2. `ImageShift`, forward hook of `visual_projection` (which `CLIPModel.forward` runs before the text tower): the
   meta-net shift π(v̂) of each normalised image feature, repeated over its C prompts, for the prompt layer to add;
3. `PerImageLogits`, forward hook of the `CLIPModel` (always called, also when the forward raises): closes the call
   and keeps each image's own C logits of CLIP's (B·C) x B similarity matrix. Computing all B·C x B similarities
   is one small matmul next to the text tower's B·C rows.
"""

from __future__ import annotations

import inspect

from torch import nn
from transformers.models.clip.modeling_clip import CLIPOutput

from .layer import CoCoOpLayer


class ConditioningHook:
    """Base of the three hooks: bound to the CoCoOp layer of the same model."""

    def __init__(self, layer: CoCoOpLayer) -> None:
        self.layer = layer


class ConditionedCall(ConditioningHook):
    """Forward pre-hook (with kwargs) of the `CLIPModel`: repeats the text inputs per image and opens the call."""

    def __init__(self, layer: CoCoOpLayer, clip: nn.Module) -> None:
        super().__init__(layer)
        parameters = list(inspect.signature(type(clip).forward).parameters.values())[1:]
        self.positional = tuple(p.name for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD)

    def __call__(self, clip, args, kwargs):
        kwargs = {**dict(zip(self.positional, args)), **kwargs}
        pixel_values, input_ids = kwargs.get("pixel_values"), kwargs.get("input_ids")
        if self.layer.conditioned_adapter() is None or pixel_values is None or input_ids is None:
            return None
        if kwargs.get("return_loss") or kwargs.get("return_dict") is False:
            raise ValueError(
                "CoCoOp gives per-image class logits in a CLIPOutput; CLIP's contrastive loss (return_loss=True) and "
                "tuple outputs (return_dict=False) do not apply. Use a cross-entropy on logits_per_image (e.g. "
                "peft_effadapt.CLIPZeroShotClassifier).")
        images, classes = pixel_values.shape[0], input_ids.shape[0]
        for key in ("input_ids", "attention_mask", "position_ids"):
            value = kwargs.get(key)
            if value is not None and value.shape[0] == classes:
                kwargs[key] = value.repeat(images, 1)
        self.layer.open_conditioned_call(classes)
        return (), kwargs


class ImageShift(ConditioningHook):
    """Forward hook of `visual_projection`: inside a conditioned call, sets the per-row context shift."""

    def __call__(self, module, args, output):
        self.layer.shift_rows(nn.functional.normalize(output, dim=-1))


class PerImageLogits(ConditioningHook):
    """Forward hook (always called) of the `CLIPModel`: closes the call and returns image i's logits over the C
    prompts conditioned on image i."""

    def __call__(self, clip, args, output):
        classes = self.layer.close_conditioned_call()
        if classes is None or output is None:  # not a conditioned call, or the forward raised
            return None
        images = output.image_embeds.shape[0]
        logits = output.logits_per_text.view(images, classes, images).diagonal(dim1=0, dim2=2).t()
        return CLIPOutput(logits_per_image=logits, logits_per_text=logits.t(),
                          text_embeds=output.text_embeds.view(images, classes, -1), image_embeds=output.image_embeds,
                          text_model_output=output.text_model_output, vision_model_output=output.vision_model_output)


def conditioning_hooks(layer: CoCoOpLayer, clip: nn.Module) -> list:
    """Registers the three hooks on `clip` for `layer`; returns their handles."""
    return [
        clip.register_forward_pre_hook(ConditionedCall(layer, clip), with_kwargs=True),
        clip.visual_projection.register_forward_hook(ImageShift(layer)),
        clip.register_forward_hook(PerImageLogits(layer), always_call=True),
    ]
