from __future__ import annotations

from ...merging import TokenMergingModel
from .layer import ToMeBlock, ToMeLayer


class ToMeModel(TokenMergingModel):
    """Token Merging (Bolya et al., ICLR 2023) as a weight-free PEFT type.

    Built by peft from a [`ToMeConfig`] on the same model families as [`PYRAModel`]. Nothing is saved but
    `modules_to_save` and the resolved schedule (in the config); ``merge_and_unload`` returns the base class still
    merging tokens, ``unload`` the plain model.

    Example:
        ```python
        from peft import get_peft_model
        from peft_effadapt import ToMeConfig
        from peft_effadapt.testing import load_tiny_vit

        model = get_peft_model(load_tiny_vit()[0], ToMeConfig(merge_schedule=8))  # r = 8 tokens merged per layer
        plain = model.unload()
        ```
    """

    method_name = "ToMe"
    prefix: str = "tome_"
    tuner_layer_cls = ToMeLayer
    block_cls = ToMeBlock
