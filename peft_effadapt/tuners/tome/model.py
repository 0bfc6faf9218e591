from __future__ import annotations

from ...merging import SUPPORTED_MODELS, TokenMergingModel
from .layer import ToMeBlock, ToMeLayer


class ToMeModel(TokenMergingModel):
    """Token Merging (Bolya et al., ICLR 2023) as a weight-free PEFT type.

    Use it through peft: ``get_peft_model(vit, ToMeConfig(merge_schedule=16, modules_to_save=["classifier"]))``.
    Supported: {models} (and subclasses). Nothing is saved but `modules_to_save` and the resolved schedule (in the
    config); ``merge_and_unload`` returns the base class still merging tokens, ``unload`` the plain model.
    """.format(models=", ".join(SUPPORTED_MODELS))

    method_name = "ToMe"
    prefix: str = "tome_"
    tuner_layer_cls = ToMeLayer
    block_cls = ToMeBlock
