"""ToMe as a weight-free PEFT type on HF ViT / DeiT / CLIP (spec tome.md §e)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft import get_peft_model
from test_merging import reference_merge
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    DeiTConfig,
    DeiTForImageClassificationWithTeacher,
    ViTConfig,
    ViTForMaskedImageModeling,
    ViTModel,
)

from peft_effadapt import ToMeConfig
from peft_effadapt.testing import tiny_clip, tiny_clip_vision, tiny_pixel_values, tiny_text_inputs, tiny_vit
from peft_effadapt.tuners.tome import ToMeBlock

from fp32 import assert_fp32_close

VIT = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, image_size=64,
           patch_size=8)  # 8x8 patches + CLS = 65 tokens


def vit(seed=0, **overrides):
    return tiny_vit(seed=seed, **{**VIT, **overrides})


def pixels(batch=3, size=64):
    return tiny_pixel_values(batch=batch, image_size=size)


def tome(model, **config):
    return get_peft_model(model, ToMeConfig(**config)).eval()


def logits(model, x, **kwargs):
    with torch.no_grad():
        return model(pixel_values=x, **kwargs).logits


# -- exactness and reference --------------------------------------------------------------------------------------
def test_r_zero_equals_base_exactly():
    x = pixels()
    torch.testing.assert_close(logits(tome(vit(), merge_schedule=0), x), logits(vit(), x), rtol=0, atol=0)
    base = tiny_clip(seed=0)
    inputs = {"pixel_values": pixels(2, 32), **tiny_text_inputs(batch=3)}
    with torch.no_grad():
        expected = base(**inputs).logits_per_image
        got = tome(tiny_clip(seed=0), merge_schedule=0)(**inputs).logits_per_image
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def reference_tome_vit(model, x, schedule, prop_attn=True):
    """ToMe on a plain ViTForImageClassification, written from the paper: merge between attention and MLP, keys
    averaged over heads as the metric, log-size proportional attention; merging done per sample by the test's own
    reference_merge."""
    vit_model = model.vit
    hidden = vit_model.embeddings(x)
    sizes = None
    heads = model.config.num_attention_heads
    for block, r in zip(vit_model.layers, schedule):
        attn = block.attention
        batch, n, d = hidden.shape
        h = block.layernorm_before(hidden)
        q, k, v = (p(h).view(batch, n, heads, d // heads).transpose(1, 2) for p in (attn.q_proj, attn.k_proj,
                                                                                      attn.v_proj))
        scores = q @ k.transpose(-1, -2) * (d // heads) ** -0.5
        if sizes is not None and prop_attn:
            scores = scores + torch.stack(sizes)[:, None, None, :, 0].log()
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, n, d)
        hidden = hidden + attn.o_proj(out)
        metric = k.mean(1)
        if r > 0:
            sizes = sizes or [hidden.new_ones(n, 1) for _ in range(batch)]
            merged = [reference_merge(metric[b], hidden[b], sizes[b], r, protected=1) for b in range(batch)]
            hidden = torch.stack([m[0] for m in merged])
            sizes = [m[1] for m in merged]
        hidden = hidden + block.mlp(block.layernorm_after(hidden))
    return model.classifier(vit_model.layernorm(hidden)[:, 0])


@pytest.mark.parametrize("prop_attn", [True, False])
def test_equals_reference_reimplementation(prop_attn):
    schedule = [8, 8, 8, 6]
    base = vit().double()
    x = pixels().double()
    with torch.no_grad():
        expected = reference_tome_vit(base, x, schedule, prop_attn)
    got = logits(tome(vit().double(), merge_schedule=schedule, prop_attn=prop_attn), x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


# -- token counts, sizes, sources ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "schedule,counts",
    [
        ([8, 8, 8, 6], [65, 57, 49, 41, 35]),
        (8, [65, 57, 49, 41, 33]),
        ({"r": 8, "inflect": -1}, [65, 49, 39, 34, 34]),
        ("low", [65, 49, 33, 17, 9]),
        ("high", [65, 33, 17, 9, 5]),
    ],
)
def test_token_counts_per_layer(schedule, counts):
    model = tome(vit(), merge_schedule=schedule, trace_source=True)
    out = model(pixel_values=pixels(), output_hidden_states=True)
    assert model.base_model.token_counts() == counts == model.base_model.planned_token_counts()
    assert [h.shape[1] for h in out.hidden_states] == counts  # hidden states shrink layer by layer
    state = model.base_model.merge_state()
    assert torch.all(state.size.sum(1) == 65) and torch.all(state.size >= 1)
    assert torch.all(state.source[:, 0, 0] == 1) and torch.all(state.source[:, 0].sum(-1) == 1)  # CLS alone, first
    torch.testing.assert_close(state.source.sum(-1, keepdim=True), state.size)


def test_last_block_merge_cannot_change_cls_logits():
    x = pixels()
    a = logits(tome(vit(), merge_schedule=[8, 8, 8, 6]), x)
    b = logits(tome(vit(), merge_schedule=[8, 8, 8, 0]), x)
    assert_fp32_close(a, b)


def test_batch_independence():
    model = tome(vit(), merge_schedule=[8, 8, 8, 6])
    x = pixels()
    y = x.clone()
    y[1] = torch.randn_like(y[1])
    assert_fp32_close(logits(model, x)[0], logits(model, y)[0])


def test_eager_and_sdpa_agree():
    x = pixels()
    eager = tome(vit(attn_implementation="eager"), merge_schedule=[8, 8, 8, 6])
    sdpa = tome(vit(attn_implementation="sdpa"), merge_schedule=[8, 8, 8, 6])
    assert eager.base_model.model.config._attn_implementation == "eager"
    assert_fp32_close(logits(eager, x), logits(sdpa, x))
    out = eager(pixel_values=x, output_attentions=True)
    assert [a.shape[-1] for a in out.attentions] == [65, 57, 49, 41]


def test_clip_vision_and_clip_model_merge_only_the_vision_tower():
    model = tome(tiny_clip(seed=0), merge_schedule=[4, 4])
    wrapped = [n for n, m in model.named_modules() if isinstance(m, ToMeBlock)]
    assert wrapped == [f"base_model.model.vision_model.encoder.layers.{i}" for i in range(2)]
    inputs = {"pixel_values": pixels(2, 32), **tiny_text_inputs(batch=3)}
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits_per_image.shape == (2, 3) and torch.isfinite(out.logits_per_image).all()
    assert model.base_model.token_counts() == [17, 13, 9]
    vision = tome(tiny_clip_vision(seed=0), merge_schedule=[4, 4])
    with torch.no_grad():
        assert vision(pixel_values=pixels(2, 32)).last_hidden_state.shape[1] == 9


def test_deit_protects_cls_and_distillation_token():
    torch.manual_seed(0)
    config = DeiTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        image_size=32, patch_size=4, num_labels=3)
    base = DeiTForImageClassificationWithTeacher(config).eval()
    model = tome(copy.deepcopy(base), merge_schedule=[16, 16], trace_source=True)
    x = pixels(2, 32)
    with torch.no_grad():
        out = model(pixel_values=x)
    assert model.base_model.token_counts() == [66, 50, 34]
    source = model.base_model.merge_state().source
    assert torch.all(source[:, 0, 0] == 1) and torch.all(source[:, 1, 1] == 1)
    assert torch.all(source[:, :2].sum(-1) == 1)
    assert out.logits.shape == (2, 3)
    zero = tome(copy.deepcopy(base), merge_schedule=0)
    with torch.no_grad():
        torch.testing.assert_close(zero(pixel_values=x).logits, base(pixel_values=x).logits, rtol=0, atol=0)


def test_flops_drop_with_merging():
    x = pixels(1)

    def flops(model):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(pixel_values=x)
        return counter.get_total_flops()

    base = flops(vit(attn_implementation="eager"))
    merged = flops(tome(vit(attn_implementation="eager"), merge_schedule="high"))
    assert merged < 0.6 * base


# -- unload / merge_and_unload ------------------------------------------------------------------------------------
def test_merge_and_unload_keeps_merging_and_unload_restores_base():
    x = pixels()
    model = tome(vit(), merge_schedule=[8, 8, 8, 6])
    expected = logits(model, x)
    merged = model.merge_and_unload()
    assert type(merged).__name__ == "ViTForImageClassification"
    assert type(merged.vit.layers[0]).__name__ == "TokenMergingViTLayer"
    torch.testing.assert_close(logits(merged, x), expected, rtol=0, atol=0)
    out = merged(pixel_values=x, output_hidden_states=True)
    assert [h.shape[1] for h in out.hidden_states] == [65, 57, 49, 41, 35]
    plain = tome(vit(), merge_schedule=[8, 8, 8, 6]).unload()
    torch.testing.assert_close(logits(plain, x), logits(vit(), x), rtol=0, atol=0)
    assert not plain.vit._forward_pre_hooks


def test_gradient_checkpointing_gives_same_gradients():
    x = pixels()

    def grads(checkpointing):
        model = get_peft_model(vit(), ToMeConfig(merge_schedule=[8, 8, 8, 6], modules_to_save=["classifier"]))
        for p in model.base_model.model.vit.embeddings.parameters():
            p.requires_grad_(True)  # make the checkpointed layers part of the graph
        if checkpointing:
            model.base_model.model.gradient_checkpointing_enable({"use_reentrant": False})
        model.train()
        model(pixel_values=x).logits.pow(2).sum().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and len(plain) > 2
    for name in plain:
        assert_fp32_close(checkpointed[name], plain[name], msg=name)


# -- bad input ------------------------------------------------------------------------------------------------------
def test_schedule_over_the_50_percent_rule_raises_naming_layer_and_counts_when_strict():
    model = vit()
    before = str(model)
    with pytest.raises(ValueError, match=r"r=10 tokens in layer 3 \(vit.layers.3\), but only 17 tokens enter"):
        get_peft_model(model, ToMeConfig(merge_schedule=[16, 16, 16, 10], clamp_schedule=False))
    assert str(model) == before  # untouched


def test_schedule_over_the_50_percent_rule_is_clamped_by_default_with_one_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clamped = tome(vit(), merge_schedule=[16, 16, 16, 10])
    messages = [str(w.message) for w in caught if "merge schedule" in str(w.message)]
    assert len(messages) == 1 and "Resolved schedule: [16, 16, 16, 8]" in messages[0]
    config = clamped.peft_config["default"]
    assert config.clamp_schedule is True and config.layer_schedule == [16, 16, 16, 8]
    clamped(pixel_values=pixels())
    assert clamped.base_model.token_counts() == clamped.base_model.planned_token_counts() == [65, 49, 33, 17, 9]


def test_readme_schedule_runs_on_vit_b16_at_224_as_planned():
    """ToMeConfig(merge_schedule=16) on a ViT-B/16-shaped ViTModel (ViTConfig() defaults, random weights): layer 11
    receives 21 tokens and can merge 10, so the schedule is clamped, and the forward runs the saved plan."""
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = get_peft_model(ViTModel(ViTConfig()), ToMeConfig(merge_schedule=16)).eval()
    assert sum("Resolved schedule" in str(w.message) for w in caught) == 1
    assert model.peft_config["default"].layer_schedule == [16] * 11 + [10]
    with torch.no_grad():
        model(pixel_values=tiny_pixel_values(batch=1, image_size=224))
    assert model.base_model.token_counts() == model.base_model.planned_token_counts()
    assert model.base_model.planned_token_counts()[-2:] == [21, 11]


def test_padding_mask_is_refused_clearly():
    model = tome(vit(attn_implementation="eager"), merge_schedule=8)
    mask = torch.ones(3, 65)
    mask[:, -5:] = 0
    with pytest.raises(ValueError, match="attention/padding mask"):
        model(pixel_values=pixels(), attention_mask=mask)


def test_a_mask_that_masks_nothing_is_accepted():
    """transformers materialises a no-padding mask in some paths (torch.compile); it changes nothing, so it is fine."""
    model = tome(vit(attn_implementation="eager"), merge_schedule=8)
    x = pixels()
    with torch.no_grad():
        expected = model(pixel_values=x).logits
        got = model(pixel_values=x, attention_mask=torch.ones(3, 65)).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_flash_and_flex_attention_are_refused():
    model = vit()
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="'eager' and 'sdpa'"):
        get_peft_model(model, ToMeConfig())
    model = tome(vit(), merge_schedule=8)
    model.base_model.model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="flash_attention_2"):
        model(pixel_values=pixels())


def test_unsupported_model_family_lists_supported_classes():
    model = ViTForMaskedImageModeling(tiny_vit(seed=0).config)  # a ViT whose head reads the patch grid
    with pytest.raises(ValueError, match="ViTModel, ViTForImageClassification, .*CLIPModel, .*Dinov2Model.* and their subclasses"):
        get_peft_model(model, ToMeConfig())


class UserViT(ViTModel):
    """A user's own subclass of ViTModel (e.g. with an extra method): still a ViT for every architecture check."""

    def describe(self) -> str:
        return "user vit"


def test_subclass_of_vit_model_is_accepted_and_runs_like_its_base_class():
    base = vit(with_head=False)
    user = UserViT(base.config, add_pooling_layer=False)
    user.load_state_dict(base.state_dict())
    x = pixels()
    expected, model = tome(base, merge_schedule=8), tome(user.eval(), merge_schedule=8)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x).last_hidden_state,
                                   expected(pixel_values=x).last_hidden_state, rtol=0, atol=0)
    assert model.base_model.token_counts() == [65, 57, 49, 41, 33]


def test_text_tower_and_partial_targets_are_refused():
    with pytest.raises(ValueError, match="text tower"):
        get_peft_model(tiny_clip(seed=0), ToMeConfig(target_modules=r".*encoder\.layers\.\d+"))
    with pytest.raises(ValueError, match="every encoder layer"):
        get_peft_model(vit(), ToMeConfig(target_modules=r"vit\.layers\.[01]"))
    with pytest.raises(TypeError, match="whole encoder layers"):
        get_peft_model(vit(), ToMeConfig(target_modules=["q_proj"]))


@pytest.mark.parametrize("bad", [dict(protected_tokens=3), dict(merge_schedule="fast"), dict(prop_attn="yes"),
                                 dict(clamp_schedule=1)])
def test_bad_config_values_are_named(bad):
    key, value = next(iter(bad.items()))
    with pytest.raises(ValueError, match=key.split("_")[0] if key != "merge_schedule" else "preset"):
        ToMeConfig(**bad)
