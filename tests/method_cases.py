"""One entry per registered PEFT method: how to build a small model, a config and inputs for the conformance suite.

A later method adds itself with one `MethodCase` in `CASES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from peft import PeftConfig
from torch import nn

from peft_effadapt import ConsolidatorConfig, CoOpConfig, RLPConfig
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
    weight_free: bool = False  # the adapter file holds no tensors of the method itself (e.g. ToMe): nothing to damage
    # Another config of the method whose adapter computes visibly different outputs from make_config's even without
    # trained weights (weight-free methods: another schedule), so that loading one next to the other is observable.
    # None: make_config (its weights tell the adapters apart).
    make_variant_config: Callable[..., PeftConfig] | None = None


def _vit_inputs():
    return {"pixel_values": tiny_pixel_values(batch=3)}


def _clip_inputs():
    return {"pixel_values": tiny_pixel_values(batch=2), **tiny_text_inputs(batch=3)}


# CLIP text prompts in placeholder format for the prompt methods (tiny CLIP: BOS=1, EOS=2, PAD=0): "[BOS] X X X X
# {class}. [EOS]" with placeholder id 7, "." = 5, classes [20], [21, 22], [23, 24, 25]; context from ids 10..13.
PROMPT_PLACEHOLDER_ID = 7
PROMPT_CTX_INIT_IDS = [10, 11, 12, 13]


def _prompt_inputs():
    rows = [[1] + [PROMPT_PLACEHOLDER_ID] * 4 + cls + [5, 2] for cls in ([20], [21, 22], [23, 24, 25])]
    ids = torch.zeros(3, max(map(len, rows)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    return {"pixel_values": tiny_pixel_values(batch=2), "input_ids": ids, "attention_mask": mask}


def _prompt_kwargs():
    return dict(ctx_init_token_ids=list(PROMPT_CTX_INIT_IDS), placeholder_token_id=PROMPT_PLACEHOLDER_ID)


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
    MethodCase(
        id="rlp-clip",
        make_model=lambda: tiny_clip(seed=0),
        make_config=lambda **kw: RLPConfig(rank=2, lowrank_dropout=0.0, **_prompt_kwargs(), **kw),
        make_inputs=_prompt_inputs,
        output=lambda out: out.logits_per_image,
    ),
    MethodCase(
        id="coop-clip",
        make_model=lambda: tiny_clip(seed=0),
        make_config=lambda **kw: CoOpConfig(**_prompt_kwargs(), **kw),
        make_inputs=_prompt_inputs,
        output=lambda out: out.logits_per_image,
    ),
]


# -- token merging (issue 6): ToMe (weight-free) and PYRA ---------------------------------------------------------
from peft_effadapt import ToMeConfig  # noqa: E402

CASES += [
    MethodCase(
        id="tome-vit-cls",
        make_model=lambda: tiny_vit(seed=0),
        make_config=lambda **kw: ToMeConfig(merge_schedule=[4, 4], modules_to_save=["classifier"], **kw),
        make_inputs=_vit_inputs,
        output=lambda out: out.logits,
        weight_free=True,
        make_variant_config=lambda **kw: ToMeConfig(merge_schedule=[6, 2], modules_to_save=["classifier"], **kw),
    ),
    MethodCase(
        id="tome-clip",
        make_model=lambda: tiny_clip(seed=0),
        make_config=lambda **kw: ToMeConfig(merge_schedule=[4, 3], modules_to_save=["visual_projection"], **kw),
        make_inputs=_clip_inputs,
        output=lambda out: out.logits_per_image,
        weight_free=True,
        make_variant_config=lambda **kw: ToMeConfig(merge_schedule=[2, 6], modules_to_save=["visual_projection"],
                                                    **kw),
    ),
]

from peft_effadapt import PYRAConfig  # noqa: E402

CASES += [
    MethodCase(
        id="pyra-vit-cls",
        make_model=lambda: tiny_vit(seed=0),
        make_config=lambda **kw: PYRAConfig(
            merge_schedule=[4, 4], lora_r=4, lora_dropout=0.0, modules_to_save=["classifier"], **kw
        ),
        make_inputs=_vit_inputs,
        output=lambda out: out.logits,
    ),
    MethodCase(
        id="pyra-clip-vision-unshared",
        make_model=lambda: tiny_clip_vision(seed=0),
        make_config=lambda **kw: PYRAConfig(merge_schedule="high", lora_r=2, lora_shared_qkv_a=False, **kw),
        make_inputs=lambda: {"pixel_values": tiny_pixel_values(batch=2)},
        output=lambda out: out.pooler_output,
    ),
]

# -- QPrompt (issue 5): quantised CoOp (1 bit), quantised RLP (2 bits), QMaPLe (4 bits, not mergeable) -------------
from peft_effadapt import QPromptConfig  # noqa: E402

CASES += [
    MethodCase(
        id="qprompt-coop-clip",
        make_model=lambda: tiny_clip(seed=0),
        make_config=lambda **kw: QPromptConfig(host="coop", bits=1, **_prompt_kwargs(), **kw),
        make_inputs=_prompt_inputs,
        output=lambda out: out.logits_per_image,
    ),
    MethodCase(
        id="qprompt-rlp-clip",
        make_model=lambda: tiny_clip(seed=0),
        make_config=lambda **kw: QPromptConfig(host="rlp", bits=2, rlp_rank=2, rlp_dropout=0.0, **_prompt_kwargs(),
                                               **kw),
        make_inputs=_prompt_inputs,
        output=lambda out: out.logits_per_image,
    ),
    MethodCase(
        id="qprompt-maple-clip",
        make_model=lambda: tiny_clip(seed=0, vision_config=dict(hidden_size=48)),  # coupling 32 -> 48
        make_config=lambda **kw: QPromptConfig(host="maple", bits=4, prompt_depth=2, **_prompt_kwargs(), **kw),
        make_inputs=_prompt_inputs,
        output=lambda out: out.logits_per_image,
        mergeable=False,
    ),
]

# -- TempMe (issue 7): 2 videos x 4 frames through the tiny CLIP; per-frame logits keep CLIP's shapes -----------------
from peft_effadapt import TempMeConfig  # noqa: E402

CASES += [
    MethodCase(
        id="tempme-clip",
        make_model=lambda: tiny_clip(seed=0),
        make_config=lambda **kw: TempMeConfig(
            num_frames=4, imgme_r=2, clip_merge_layers=[1], clip_group_sizes=[4], lora_r=2, **kw
        ),
        make_inputs=lambda: {"pixel_values": tiny_pixel_values(batch=8), **tiny_text_inputs(batch=3)},
        output=lambda out: out.logits_per_image,
    ),
]

# -- CoCoOp (image-conditioned context) and MaPLe (deep multimodal prompts): the prompt baselines, not mergeable -------
from peft_effadapt import CoCoOpConfig, MaPLeConfig  # noqa: E402

CASES += [
    MethodCase(
        id="cocoop-clip",
        make_model=lambda: tiny_clip(seed=0),
        make_config=lambda **kw: CoCoOpConfig(**_prompt_kwargs(), **kw),
        make_inputs=_prompt_inputs,
        output=lambda out: out.logits_per_image,
        mergeable=False,
    ),
    MethodCase(
        id="maple-clip",
        make_model=lambda: tiny_clip(seed=0, vision_config=dict(hidden_size=48)),  # coupling 32 -> 48
        make_config=lambda **kw: MaPLeConfig(prompt_depth=2, **_prompt_kwargs(), **kw),
        make_inputs=_prompt_inputs,
        output=lambda out: out.logits_per_image,
        mergeable=False,
    ),
]


# -- the prompt methods on SigLIP (issue 21): no BOS, context from position 0, prompts padded to max_length ---------
from siglip_models import placeholder_inputs as _siglip_prompt_inputs  # noqa: E402
from siglip_models import prompt_kwargs as _siglip_prompt_kwargs  # noqa: E402
from siglip_models import tiny_siglip  # noqa: E402


def _frozen_siglip():
    """The base frozen as peft leaves it: SigLIP's vision pooling head (an nn.MultiheadAttention) takes another
    matmul path when its weights require grad (torch's batch folding depends on requires_grad, even under no_grad),
    which moves pooled features by 1 ulp; frozen, the plain and the adapted model run the same kernels."""
    return tiny_siglip(seed=0).requires_grad_(False)


CASES += [
    MethodCase(
        id="coop-siglip",
        make_model=_frozen_siglip,
        make_config=lambda **kw: CoOpConfig(**_siglip_prompt_kwargs(), **kw),
        make_inputs=_siglip_prompt_inputs,
        output=lambda out: out.logits_per_image,
    ),
    MethodCase(
        id="rlp-siglip",
        make_model=_frozen_siglip,
        make_config=lambda **kw: RLPConfig(rank=2, lowrank_dropout=0.0, **_siglip_prompt_kwargs(), **kw),
        make_inputs=_siglip_prompt_inputs,
        output=lambda out: out.logits_per_image,
    ),
]
