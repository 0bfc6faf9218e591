"""TempMe (issue 7): schedule arithmetic, the token trace of the spec, FLOPs at ViT-B/32 shape, bad input, training."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPConfig, CLIPModel, CLIPVisionModel, Trainer, TrainingArguments

from peft_effadapt import CLIPVideoRetrieval, TempMeConfig
from peft_effadapt.merging import bipartite_soft_matching, group_sequences, merge_wavg
from peft_effadapt.testing import tiny_clip, tiny_clip_vision, tiny_text_inputs, tiny_vit
from peft_effadapt.tuners.tempme import TempMeLayer, plan_table, tempme_plan

from fp32 import assert_fp32_close

# the spec's CPU test model (tempme.md §e): hidden 64, 4 heads, 6 layers, 32² frames, patch 8 -> 17 tokens per frame
SPEC_VISION = dict(hidden_size=64, num_hidden_layers=6, num_attention_heads=4, intermediate_size=128, image_size=32,
                   patch_size=8)
SPEC_CONFIG = dict(imgme_r=1, clip_merge_layers=[2, 3, 4], clip_group_sizes=[2, 2, 3])


def spec_vision(seed=0, **kw):
    return tiny_clip_vision(seed=seed, vision_config={**SPEC_VISION, **kw})


def spec_clip(seed=0):
    return tiny_clip(seed=seed, vision_config=SPEC_VISION)


def videos(batch=2, frames=12, seed=0, size=32):
    return torch.randn(batch, frames, 3, size, size, generator=torch.Generator().manual_seed(seed))


def b32_config(**vision) -> CLIPConfig:
    return CLIPConfig(
        text_config=dict(hidden_size=512, num_hidden_layers=12, num_attention_heads=8, intermediate_size=2048),
        vision_config=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                           image_size=224, patch_size=32, **vision),
        projection_dim=512,
    )


# -- schedule -------------------------------------------------------------------------------------------------------
def test_b32_schedule_is_the_spec_table():
    rows = plan_table(tempme_plan(50, 12))  # (layer, kind, N in, r_c, r_i, N out, CLS, sequences per video)
    assert [r[5] for r in rows[:8]] == [48, 46, 44, 42, 40, 38, 36, 34]
    assert all(r[1] == "imgme" and r[4] == 2 and r[7] == 12 for r in rows[:8])
    assert rows[8:] == [(8, "clipme", 34, 20, 4, 44, 2, 6), (9, "clipme", 44, 26, 6, 56, 4, 3),
                        (10, "clipme", 56, 50, 11, 107, 12, 1), (11, "intra", 107, 0, 10, 97, 12, 1)]


def test_inferred_b16_setting_ends_at_127_tokens():
    config = TempMeConfig.from_preset("vit-b/16")
    assert (config.imgme_r, config.cross_clip_merge_ratio, config.intra_clip_merge_ratio) == (10, 0.4, 0.2)
    plan = tempme_plan(197, 12, config.num_frames, config.imgme_r, config.clip_merge_layers, config.clip_group_sizes,
                       config.cross_clip_merge_ratio, config.intra_clip_merge_ratio)
    assert plan[-1].tokens_out == 127 and plan[-1].cls_out == 12
    # the repo's 30/10 ratios with r = 10 would keep 321 tokens (spec §b.3)
    assert tempme_plan(197, 12, imgme_r=10)[-1].tokens_out == 321


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_frames=10), "divisible"),
    (dict(clip_group_sizes=[2, 2]), "same length"),
    (dict(num_frames=-1), "num_frames"),
    (dict(cross_clip_merge_ratio=1.5), "cross_clip_merge_ratio"),
    (dict(lora_shared_qkv_a="yes"), "lora_shared_qkv_a"),
])
def test_bad_config_values_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TempMeConfig(**kwargs)


# -- the token trace (spec §e) ----------------------------------------------------------------------------------------
def test_tiny_trace_matches_the_spec():
    model = get_peft_model(spec_vision(), TempMeConfig(**SPEC_CONFIG))
    shapes = []
    for module in model.modules():
        if isinstance(module, TempMeLayer):
            module.register_forward_hook(lambda m, a, out: shapes.append(tuple(out.shape[:2])))
    with torch.no_grad():
        out = model(pixel_values=videos())
    assert shapes == [(24, 16), (24, 15), (12, 19), (6, 25), (2, 48), (2, 44)]
    assert model.base_model.token_counts() == [17, 16, 15, 19, 25, 48, 44]
    plan = model.base_model.tempme_plan()
    assert [(p.r_cross, p.r_intra) for p in plan[2:5]] == [(9, 2), (11, 2), (22, 5)]
    assert out.pooler_output.view(2, 12, 64).shape == (2, 12, 64)
    size = model.base_model.merge_state().size
    assert size.shape == (2, 44, 1) and torch.all(size.sum(1) == 12 * 17)
    assert torch.all(size[:, :12] == 1)  # the 12 class tokens in front were never merged


def test_b32_video_goes_from_600_to_97_tokens_with_12_cls():
    with torch.device("meta"):
        vision = CLIPVisionModel(b32_config().vision_config)
    model = get_peft_model(vision, TempMeConfig())
    with torch.no_grad():
        out = model(pixel_values=torch.empty(12, 3, 224, 224, device="meta"))
    assert model.base_model.token_counts() == [50, 48, 46, 44, 42, 40, 38, 36, 34, 44, 56, 107, 97]
    assert tuple(out.last_hidden_state.shape) == (1, 97, 768)  # one sequence per video (12 x 50 = 600 in)
    assert tuple(out.pooler_output.shape) == (12, 768)  # the kept class token of every frame


def test_official_lora_has_507648_parameters_on_b32():
    with torch.device("meta"):
        clip = CLIPModel(b32_config())
    model = get_peft_model(clip, TempMeConfig())
    assert model.get_nb_trainable_parameters()[0] == 507_648
    with torch.device("meta"):
        standard = get_peft_model(CLIPModel(b32_config()), TempMeConfig(lora_shared_qkv_a=False))
    assert standard.get_nb_trainable_parameters()[0] == 737_280 + 16_128
    shapes = {n.split(".")[-2]: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    assert shapes["tempme_lora_A"] in {(8, 768), (8, 512)}


def _gmacs(model, pixels) -> float:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(pixel_values=pixels)
    return counter.get_total_flops() / 2 / 1e9


def test_gmacs_of_12_frames_on_b32_match_the_paper():
    """FlopCounterMode on a ViT-B/32-shaped vision tower (meta tensors: counts follow from shapes), eager attention."""
    config = b32_config().vision_config
    config._attn_implementation = "eager"
    pixels = torch.empty(12, 3, 224, 224, device="meta")
    with torch.device("meta"):
        base = _gmacs(CLIPVisionModel(config), pixels)
        merged_lora = _gmacs(get_peft_model(CLIPVisionModel(config), TempMeConfig(lora_r=0)), pixels)
        with_lora = _gmacs(get_peft_model(CLIPVisionModel(config), TempMeConfig()), pixels)
    assert base == pytest.approx(52.9, rel=0.005)
    assert merged_lora == pytest.approx(34.7, rel=0.005)
    assert with_lora == pytest.approx(34.7, rel=0.005)  # the unmerged LoRA branch adds ~0.1 G


# -- behaviour ------------------------------------------------------------------------------------------------------
def test_degenerate_schedule_equals_the_plain_model():
    base = spec_vision()
    model = get_peft_model(spec_vision(), TempMeConfig(imgme_r=0, clip_merge_layers=[], clip_group_sizes=[],
                                                       num_frames=4))
    pixels = videos(2, 4).flatten(0, 1)
    with torch.no_grad():
        assert_fp32_close(model(pixel_values=pixels).pooler_output, base(pixel_values=pixels).pooler_output)


def test_videos_are_independent_of_each_other():
    model = get_peft_model(spec_vision(), TempMeConfig(**SPEC_CONFIG, init_weights=False)).eval()
    a, b = videos(2, seed=0), videos(2, seed=1)
    b[0] = a[0]
    with torch.no_grad():
        out_a, out_b = model(pixel_values=a).pooler_output, model(pixel_values=b).pooler_output
    assert_fp32_close(out_a[:12], out_b[:12])
    assert not torch.allclose(out_a[12:], out_b[12:])


def test_regrouping_puts_every_cls_first_then_patches_in_frame_order():
    frames = torch.arange(4.0)[:, None, None].expand(4, 3, 1) + torch.tensor([0.0, 0.1, 0.2])[None, :, None]
    grouped = group_sequences(frames, group=2, protected=1)  # 4 frames of 3 tokens (CLS = x.0)
    expected = torch.tensor([[0.0, 1.0, 0.1, 0.2, 1.1, 1.2], [2.0, 3.0, 2.1, 2.2, 3.1, 3.2]])
    torch.testing.assert_close(grouped[:, :, 0], expected)
    with pytest.raises(ValueError, match="divisible"):
        group_sequences(frames[:3], group=2)


def test_many_protected_tokens_stay_in_front_in_order():
    torch.manual_seed(0)
    x = torch.randn(2, 20, 8)
    plan = bipartite_soft_matching(x, 7, protected=5)
    merged, size = merge_wavg(plan, x)
    assert merged.shape == (2, 13, 8)
    torch.testing.assert_close(merged[:, :5], x[:, :5])
    assert torch.all(size[:, :5] == 1) and torch.all(size.sum(1) == 20)


def test_zero_position_embedding_is_a_no_op_and_gradients_reach_everything():
    pixels, text = videos(), tiny_text_inputs(batch=2)
    without = get_peft_model(spec_clip(), TempMeConfig(**SPEC_CONFIG, clip_position_embedding=False))
    model = get_peft_model(spec_clip(), TempMeConfig(**SPEC_CONFIG))
    with torch.no_grad():
        assert_fp32_close(model.get_image_features(pixel_values=pixels).pooler_output,
                                   without.get_image_features(pixel_values=pixels).pooler_output)
    CLIPVideoRetrieval(model)(pixels, **text).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    positions = [n for n in grads if "tempme_clip_pos" in n]
    assert len(positions) == 3 and all(grads[n] is not None and grads[n].abs().sum() > 0 for n in positions)
    lora_b = [n for n in grads if "tempme_lora_B" in n]
    assert any("vision_model" in n for n in lora_b) and any("text_model" in n for n in lora_b)
    assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in lora_b)


def test_sdpa_and_eager_agree():
    eager = get_peft_model(spec_vision(), TempMeConfig(**SPEC_CONFIG, init_weights=False))
    sdpa = copy.deepcopy(eager)
    eager.base_model.model.set_attn_implementation("eager")
    sdpa.base_model.model.set_attn_implementation("sdpa")
    with torch.no_grad():
        torch.testing.assert_close(eager(pixel_values=videos()).pooler_output,
                                   sdpa(pixel_values=videos()).pooler_output, rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    pixels, text = videos(), tiny_text_inputs(batch=2)
    grads = []
    for checkpointing in (False, True):
        model = get_peft_model(spec_clip(), TempMeConfig(**SPEC_CONFIG, init_weights=False))
        if checkpointing:
            model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        CLIPVideoRetrieval(model)(pixels, **text).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_full_finetune_trains_the_backbone_but_not_the_temperature():
    model = get_peft_model(spec_clip(), TempMeConfig(**SPEC_CONFIG, lora_r=0, full_finetune=True))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("vision_model" in n and "base_layer" in n for n in trainable)
    assert any("text_model" in n for n in trainable) and any("tempme_clip_pos" in n for n in trainable)
    assert not any(n.endswith("logit_scale") for n in trainable)
    assert not any("tempme_lora" in n for n, _ in model.named_parameters())


def test_full_finetune_round_trip_through_unload_and_adapter(tmp_path):
    """The documented workflow: the adapter file holds the TempMe tensors, `unload()` the fine-tuned backbone."""
    pixels, text = videos(), tiny_text_inputs(batch=2)
    model = get_peft_model(spec_clip(), TempMeConfig(**SPEC_CONFIG, lora_r=0, full_finetune=True, init_weights=False))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    CLIPVideoRetrieval(model)(pixels, **text).loss.backward()
    optimizer.step()
    with torch.no_grad():
        expected = CLIPVideoRetrieval(model).eval().video_features(pixels)
    model.save_pretrained(tmp_path / "adapter")
    model.unload().save_pretrained(tmp_path / "base")
    reloaded = PeftModel.from_pretrained(CLIPModel.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(CLIPVideoRetrieval(reloaded).eval().video_features(pixels), expected)


# -- bad input ------------------------------------------------------------------------------------------------------
def test_frame_counts_that_do_not_fit_the_schedule_are_refused():
    model = get_peft_model(spec_vision(), TempMeConfig(**SPEC_CONFIG))
    with pytest.raises(ValueError, match=r"expects videos.*\(batch, 12, C, H, W\)"):
        model(pixel_values=videos(1, 18).flatten(0, 1))  # 18 frames: not whole 12-frame videos
    with pytest.raises(ValueError, match="num_frames=12, got videos of 6 frames"):
        model(pixel_values=videos(2, 6))
    with pytest.raises(ValueError, match="expects videos"):  # images where videos are expected
        model(pixel_values=videos(1, 5).flatten(0, 1))
    with model.disable_adapter(), torch.no_grad():  # the plain model still takes images
        assert model(pixel_values=videos(1, 5).flatten(0, 1)).pooler_output.shape == (5, 64)


@pytest.mark.parametrize("kwargs, match", [
    (dict(imgme_r=9), "imgme_r=9 is too large"),
    (dict(clip_merge_layers=[2, 3, 7]), "increasing layer indices"),
    (dict(clip_merge_layers=[3, 2, 4]), "increasing layer indices"),
])
def test_bad_schedule_leaves_the_model_untouched(kwargs, match):
    model = spec_vision()
    before = copy.deepcopy(model)
    with pytest.raises(ValueError, match=match):
        get_peft_model(model, TempMeConfig(**{**SPEC_CONFIG, **kwargs}))
    assert str(model) == str(before)
    assert not model._forward_pre_hooks and not model._forward_hooks


# -- training -------------------------------------------------------------------------------------------------------
class _Pairs(torch.utils.data.Dataset):
    def __init__(self, n=8):
        self.pixels = videos(n, seed=3)
        self.text = tiny_text_inputs(batch=n, seed=4)

    def __len__(self):
        return len(self.pixels)

    def __getitem__(self, i):
        return {"pixel_values": self.pixels[i], "input_ids": self.text["input_ids"][i],
                "attention_mask": self.text["attention_mask"][i]}


def test_trains_under_trainer(tmp_path):
    model = get_peft_model(spec_clip(), TempMeConfig(**SPEC_CONFIG))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=6e-4, weight_decay=0.2, warmup_steps=1, lr_scheduler_type="cosine",
                             max_grad_norm=1.0, report_to=[], save_strategy="no", use_cpu=True, seed=0,
                             dataloader_num_workers=0)
    result = Trainer(model=CLIPVideoRetrieval(model), args=args, train_dataset=_Pairs()).train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("tempme_" in n for n in changed)
    assert any("tempme_clip_pos" in n for n in changed) and any("text_model" in n for n in changed)


def test_subclass_of_clip_model_is_accepted_and_other_families_are_refused_by_name():
    class UserCLIPModel(CLIPModel):
        pass

    base = spec_clip()
    user = UserCLIPModel(base.config)
    user.load_state_dict(base.state_dict())
    expected = get_peft_model(base, TempMeConfig(**SPEC_CONFIG, init_weights=False)).eval()
    model = get_peft_model(user.eval(), TempMeConfig(**SPEC_CONFIG, init_weights=False)).eval()
    model.load_state_dict(expected.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model.get_image_features(pixel_values=videos()).pooler_output,
                                   expected.get_image_features(pixel_values=videos()).pooler_output, rtol=0, atol=0)
    with pytest.raises(ValueError, match="TempMe supports only CLIPModel, CLIPVisionModel and their subclasses"):
        get_peft_model(tiny_vit(), TempMeConfig(**SPEC_CONFIG))

