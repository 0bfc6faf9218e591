"""CoCoOp and MaPLe: the prompt baselines' own equations (the conformance suite covers peft's API for both)."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from peft_effadapt import CLIPZeroShotClassifier, CoCoOpConfig, CoOpConfig, MaPLeConfig, QPromptConfig
from peft_effadapt.testing import tiny_clip

from method_cases import _prompt_inputs, _prompt_kwargs

RTOL, ATOL = 1e-5, 1e-5  # fp32 logits of magnitude ~1-10 through a few small matmuls


def _vit_b16_widths(depth_layers: int = 1):
    """A CLIP with ViT-B/16's widths (text 512, vision 768, projection 512) but tiny depth, MLP and vocabulary, so
    that parameter counts can be compared with the papers' figures."""
    from transformers import CLIPModel

    from peft_effadapt.testing import tiny_clip_config

    config = tiny_clip_config(
        text_config=dict(hidden_size=512, num_attention_heads=8, intermediate_size=64, num_hidden_layers=depth_layers),
        vision_config=dict(hidden_size=768, num_attention_heads=12, intermediate_size=64,
                           num_hidden_layers=depth_layers))
    config.projection_dim = 512
    torch.manual_seed(0)
    return CLIPModel(config).eval()


# -- CoCoOp ---------------------------------------------------------------------------------------------------------
def test_cocoop_parameter_count_is_the_papers():
    model = get_peft_model(_vit_b16_widths(), CoCoOpConfig(**_prompt_kwargs()))
    assert model.get_nb_trainable_parameters()[0] == 35_360  # 2,048 + (512*32+32) + (32*512+512)


def test_cocoop_logits_equal_coop_with_the_image_shifted_context():
    """Row i of CoCoOp's logits == CoOp's logits for image i with context ctx + π(v̂_i) (an independent path)."""
    inputs = _prompt_inputs()
    cocoop = get_peft_model(tiny_clip(), CoCoOpConfig(**_prompt_kwargs(), init_weights=False)).eval()
    layer = cocoop.base_model.prompt_layer()
    with torch.no_grad():
        out = cocoop(**inputs)
        image = torch.nn.functional.normalize(
            cocoop.base_model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output, dim=-1)
        shifts = layer.shift("default", image)
    coop = get_peft_model(tiny_clip(), CoOpConfig(**_prompt_kwargs())).eval()
    for i in range(inputs["pixel_values"].shape[0]):
        with torch.no_grad():
            coop.base_model.prompt_layer().coop_ctx["default"].copy_(layer.cocoop_ctx["default"] + shifts[i])
            expected = coop(**{**inputs, "pixel_values": inputs["pixel_values"][i:i + 1]}).logits_per_image[0]
        torch.testing.assert_close(out.logits_per_image[i], expected, rtol=RTOL, atol=ATOL)
    assert out.text_embeds.shape == (2, 3, 16) and out.image_embeds.shape == (2, 16)


def test_cocoop_classifier_uses_per_image_prompts_and_trains_both_parts():
    model = get_peft_model(tiny_clip(), CoCoOpConfig(**_prompt_kwargs()))
    inputs = _prompt_inputs()
    classifier = CLIPZeroShotClassifier(model, class_names=["a", "b", "c"],
                                        class_token_ids=[[20, 5], [21, 22, 5], [23, 24, 25, 5]],
                                        special_token_ids=(1, 2, 0)).train()
    out = classifier(inputs["pixel_values"], labels=torch.tensor([0, 2]))
    with torch.no_grad():
        direct = model(**inputs).logits_per_image
    torch.testing.assert_close(out.logits, direct, rtol=RTOL, atol=ATOL)
    out.loss.backward()
    layer = model.base_model.prompt_layer()
    for param in (layer.cocoop_ctx["default"], layer.cocoop_meta_down["default"].weight,
                  layer.cocoop_meta_up["default"].weight):
        assert param.grad is not None and param.grad.abs().sum() > 0


def test_cocoop_hooks_condition_positional_calls_leave_no_state_on_failure_and_unload():
    """CoCoOp steers CLIP's own forward with hooks: positional arguments are conditioned as keywords are; a forward
    that raises midway leaves no open call behind (its closing hook is always called), so the next text-only call
    uses the plain context; `unload` removes every hook."""
    inputs = _prompt_inputs()
    model = get_peft_model(tiny_clip(), CoCoOpConfig(**_prompt_kwargs(), init_weights=False)).eval()
    clip = model.base_model.model
    with torch.no_grad():
        expected = model(**inputs).logits_per_image
        text = clip.get_text_features(input_ids=inputs["input_ids"]).pooler_output
        positional = model(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"]).logits_per_image
        torch.testing.assert_close(positional, expected, rtol=0, atol=0)
        with pytest.raises(RuntimeError):
            model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"][:, :2])  # 2 of 3 channels
        torch.testing.assert_close(clip.get_text_features(input_ids=inputs["input_ids"]).pooler_output, text,
                                   rtol=0, atol=0)
        torch.testing.assert_close(model(**inputs).logits_per_image, expected, rtol=0, atol=0)
    plain = model.unload()
    assert not (plain._forward_pre_hooks or plain._forward_hooks or plain.visual_projection._forward_hooks)
    with torch.no_grad():
        torch.testing.assert_close(plain(**inputs).logits_per_image, tiny_clip()(**inputs).logits_per_image,
                                   rtol=0, atol=0)


def test_cocoop_refuses_merge_and_text_only_models():
    model = get_peft_model(tiny_clip(), CoCoOpConfig(**_prompt_kwargs()))
    with pytest.raises(ValueError, match="conditions the prompt on each image"):
        model.merge_and_unload()
    from transformers import CLIPTextModel

    text_only = CLIPTextModel(tiny_clip().config.text_config)
    before = sum(1 for _ in text_only.modules())
    with pytest.raises(ValueError, match="needs a CLIPModel"):
        get_peft_model(text_only, CoCoOpConfig(**_prompt_kwargs()))
    assert sum(1 for _ in text_only.modules()) == before


# -- MaPLe ----------------------------------------------------------------------------------------------------------
def test_maple_parameter_count_is_the_papers():
    model = get_peft_model(_vit_b16_widths(depth_layers=9), MaPLeConfig(**_prompt_kwargs()))
    assert model.get_nb_trainable_parameters()[0] == 3_555_072  # m=2, J=9, d=512 -> 768


def test_maple_equals_qprompt_maple_host_without_quantiser():
    """MaPLe and QPrompt's MaPLe host share one deep-prompt core: same seed, same prompts, identical outputs."""
    make = lambda: tiny_clip(vision_config=dict(hidden_size=48))  # noqa: E731
    torch.manual_seed(3)
    maple = get_peft_model(make(), MaPLeConfig(prompt_depth=2, **_prompt_kwargs())).eval()
    torch.manual_seed(3)
    host = get_peft_model(make(), QPromptConfig(host="maple", quantizer="none", prompt_depth=2,
                                                **_prompt_kwargs())).eval()
    inputs = _prompt_inputs()
    with torch.no_grad():
        torch.testing.assert_close(maple(**inputs).logits_per_image, host(**inputs).logits_per_image, rtol=0, atol=0)


def test_maple_keeps_fixed_words_and_appends_visual_prompts():
    model = get_peft_model(tiny_clip(vision_config=dict(hidden_size=48)),
                           MaPLeConfig(prompt_depth=2, **_prompt_kwargs())).eval()
    layer = model.base_model.prompt_layer()
    token_embedding = layer.token_embedding.weight
    ctx_init = token_embedding[_prompt_kwargs()["ctx_init_token_ids"]]
    # the first maple_n_ctx (2) rows start from ctx_init and are learned; the rest are ctx_init's fixed words
    torch.testing.assert_close(layer.context("default").detach(), ctx_init, rtol=0, atol=0)
    assert sorted(layer.maple_prompts["default"]) == sorted(["ctx", "proj_weight", "proj_bias", "deep_text_1",
                                                             "coupling_1_weight", "coupling_1_bias"])
    seen = []
    vision = model.base_model.model.vision_model
    handle = vision.encoder.layers[1].register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).shape[1]),
        with_kwargs=True)
    with torch.no_grad():
        model(**_prompt_inputs())
    handle.remove()
    assert seen == [1 + 16 + 2]  # CLS + 4x4 patches + m visual prompts


def test_maple_refuses_merge_and_unload_restores_the_base_exactly():
    base = tiny_clip(vision_config=dict(hidden_size=48))
    inputs = _prompt_inputs()
    with torch.no_grad():
        reference = base(**inputs).logits_per_image
    model = get_peft_model(tiny_clip(vision_config=dict(hidden_size=48)),
                           MaPLeConfig(prompt_depth=2, **_prompt_kwargs(), init_weights=False))
    with pytest.raises(ValueError, match="MaPLe deep prompts"):
        model.merge_and_unload()
    plain = model.unload()
    with torch.no_grad():
        torch.testing.assert_close(plain(**inputs).logits_per_image, reference, rtol=0, atol=0)


def test_maple_config_errors_name_the_value():
    with pytest.raises(ValueError, match="maple_n_ctx=5 exceeds n_ctx=4"):
        MaPLeConfig(maple_n_ctx=5, **_prompt_kwargs())
    with pytest.raises(ValueError, match="prompt_depth must be a positive int"):
        MaPLeConfig(prompt_depth=0, **_prompt_kwargs())
    with pytest.raises(ValueError, match="prompt_depth=3 exceeds"):
        get_peft_model(tiny_clip(vision_config=dict(hidden_size=48)), MaPLeConfig(prompt_depth=3, **_prompt_kwargs()))
    with pytest.raises(ValueError, match="meta_net_hidden"):
        CoCoOpConfig(meta_net_hidden=0)


@pytest.mark.parametrize("method", ["cocoop", "maple"])
def test_example_trains_saves_and_reloads_identically(method, tmp_path, monkeypatch):
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "examples"))
    sys.modules.pop("prompt_baselines_clip", None)
    from prompt_baselines_clip import main

    result = main(["--method", method, "--steps", "3", "--output-dir", str(tmp_path)])
    assert (tmp_path / method / "adapter_model.safetensors").exists()
    assert result["params"] > 0 and 0 <= result["trained"]["hm"] <= 100
