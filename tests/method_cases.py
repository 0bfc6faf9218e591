"""One entry per registered PEFT method: how to build a small model, a config and inputs for the conformance suite.

A later method adds itself with one `MethodCase` in `CASES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from peft import PeftConfig
from torch import nn

from peft_effadapt import ConsolidatorConfig
from peft_effadapt.testing import tiny_clip, tiny_clip_vision, tiny_pixel_values, tiny_text_inputs, tiny_vit


@dataclass
class MethodCase:
    id: str
    make_model: Callable[[], nn.Module]  # deterministic: two calls give identical weights
    make_config: Callable[..., PeftConfig]  # kwargs: init_weights (False = visibly non-identity adapter)
    make_inputs: Callable[[], dict[str, torch.Tensor]]
    output: Callable[[object], torch.Tensor]  # model output -> the tensor compared
    train_loss: Callable[[object], torch.Tensor] = field(default=lambda out: out.float().pow(2).mean())
    mergeable: bool = True
    auto_class: str = "AutoPeftModel"


def _vit_inputs():
    return {"pixel_values": tiny_pixel_values(batch=3)}


def _clip_inputs():
    return {"pixel_values": tiny_pixel_values(batch=2), **tiny_text_inputs(batch=3)}


CASES = [
    MethodCase(
        id="consolidator-vit-cls",
        make_model=lambda: tiny_vit(seed=0),
        make_config=lambda **kw: ConsolidatorConfig(fc_groups=[16], modules_to_save=["classifier"], **kw),
        make_inputs=_vit_inputs,
        output=lambda out: out.logits,
    ),
    MethodCase(
        id="consolidator-vit-2branch-shuffle-separate",
        make_model=lambda: tiny_vit(seed=1, with_head=False),
        make_config=lambda **kw: ConsolidatorConfig(
            fc_groups=[8, 4], channel_shuffle=[True, False], qkv_grouping="separate", rep_drop=0.3, **kw
        ),
        make_inputs=_vit_inputs,
        output=lambda out: out.last_hidden_state,
    ),
    MethodCase(
        id="consolidator-clip",
        make_model=lambda: tiny_clip(seed=0),
        make_config=lambda **kw: ConsolidatorConfig(fc_groups=[8], **kw),
        make_inputs=_clip_inputs,
        output=lambda out: out.logits_per_image,
    ),
    MethodCase(
        id="consolidator-clip-vision",
        make_model=lambda: tiny_clip_vision(seed=0),
        make_config=lambda **kw: ConsolidatorConfig(fc_groups=[4], channel_shuffle=True, **kw),
        make_inputs=lambda: {"pixel_values": tiny_pixel_values(batch=2)},
        output=lambda out: out.pooler_output,
    ),
]
