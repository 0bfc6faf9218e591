"""QPrompt (spec qprompt.md §e Q7-Q9): QCoOp, quantised RLP and QMaPLe on a tiny HF CLIP; storage; bad input."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel

from peft_effadapt import QPromptConfig
from peft_effadapt.quantization import payload_bytes
from peft_effadapt.testing import tiny_vit

from fp32 import assert_fp32_close

BOS, EOS, PLACEHOLDER, DOT = 98, 99, 7, 5
CTX_IDS = [10, 11, 12, 13]
CLASS_IDS = [[20], [21, 22], [23, 24, 25]]


def spec_clip() -> CLIPModel:
    """Q7's tiny CLIP: text 32 wide, vocab 100 (BOS 98, EOS 99), 16 positions; vision 48 wide, 16 px, patch 4."""
    torch.manual_seed(0)
    return CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, bos_token_id=BOS, eos_token_id=EOS,
                         pad_token_id=0),
        vision_config=dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=16, patch_size=4),
        projection_dim=16,
    )).eval()


def rows(ctx, classes=CLASS_IDS):
    seqs = [[BOS] + list(ctx) + c + [DOT, EOS] for c in classes]
    ids = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    return ids


PROMPTS, HARD = rows([PLACEHOLDER] * 4), rows(CTX_IDS)
LABELS = torch.tensor([0, 1, 2, 0])


_PIXELS = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def pixels():
    return _PIXELS.clone()


def qconfig(**kw):
    kw.setdefault("ctx_init_token_ids", CTX_IDS)
    kw.setdefault("placeholder_token_id", PLACEHOLDER)
    return QPromptConfig(**kw)


def logits(model, ids=PROMPTS):
    return model(input_ids=ids, pixel_values=pixels()).logits_per_image


def train(model, steps, lr=0.05, optimizer=None):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer or torch.optim.SGD(params, lr=lr, momentum=0.9)
    model.train()
    for _ in range(steps):
        torch.nn.functional.cross_entropy(logits(model), LABELS).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def layer_of(model):
    return model.base_model.prompt_layer()


# Q7 ------------------------------------------------------------------------------------------------------------
def test_q7_unquantised_coop_equals_hard_prompt_clip():
    expected = logits(spec_clip(), HARD)
    model = get_peft_model(spec_clip(), qconfig(quantizer="none"))
    assert_fp32_close(logits(model), expected)


def test_q7_one_bit_context_holds_two_values_in_train_and_eval():
    model = get_peft_model(spec_clip(), qconfig(bits=1))
    prompt = model.base_model.prompt_matrix()
    assert prompt.shape == (4, 32) and torch.unique(prompt).numel() <= 2
    model.train()
    train_out = logits(model)
    model.eval()
    torch.testing.assert_close(train_out, logits(model), rtol=0, atol=0)  # quantised in both modes
    assert not torch.allclose(logits(model), logits(spec_clip(), HARD), atol=1e-4)


def test_ste_gradient_equals_gradient_of_used_prompt():
    """The latent receives exactly the gradient the quantised prompt would receive as a plain parameter."""
    quantised = get_peft_model(spec_clip(), qconfig(bits=2)).train()
    plain = get_peft_model(spec_clip(), qconfig(quantizer="none")).train()
    with torch.no_grad():
        layer_of(plain).tensors("default").ctx.copy_(layer_of(quantised).prompt_matrix())
    for m in (quantised, plain):
        torch.nn.functional.cross_entropy(logits(m), LABELS).backward()
    torch.testing.assert_close(logits(quantised), logits(plain), rtol=0, atol=0)
    g_q, g_p = layer_of(quantised).tensors("default").ctx.grad, layer_of(plain).tensors("default").ctx.grad
    assert g_q.abs().sum() > 0
    torch.testing.assert_close(g_q, g_p, rtol=0, atol=0)
    for name, p in quantised.named_parameters():
        if "qprompt_" not in name:
            assert p.grad is None, name


def test_refit_count_follows_schedule():
    model = get_peft_model(spec_clip(), qconfig(bits=1, t_min=3, kl_threshold=0.0))
    train(model, 10, lr=0.5)
    # threshold 0: every eligible step refits once the histogram moved at all; never more often than every t_min
    refits = model.base_model.refit_counts()["ctx"]
    assert 1 <= refits <= 10 // 3
    never = get_peft_model(spec_clip(), qconfig(bits=1, refit="never"))
    train(never, 10, lr=0.5)
    assert never.base_model.refit_counts() == {"ctx": 0}
    late = get_peft_model(spec_clip(), qconfig(bits=1, t_min=100, kl_threshold=0.0))
    train(late, 10, lr=0.5)
    assert late.base_model.refit_counts() == {"ctx": 0}


def test_training_lowers_loss_and_stays_quantised():
    model = get_peft_model(spec_clip(), qconfig(bits=2))
    with torch.no_grad():
        before = torch.nn.functional.cross_entropy(logits(model), LABELS).item()
    train(model, 25, lr=0.05)
    with torch.no_grad():
        after = torch.nn.functional.cross_entropy(logits(model), LABELS).item()
    assert after < before
    assert torch.unique(model.base_model.prompt_matrix()).numel() <= 4


# storage -------------------------------------------------------------------------------------------------------
def vit_b16_text() -> CLIPTextModel:
    torch.manual_seed(0)
    return CLIPTextModel(CLIPTextConfig(vocab_size=100, hidden_size=512, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=8, max_position_embeddings=16, bos_token_id=BOS,
                                        eos_token_id=EOS)).eval()


def test_one_bit_qcoop_4x512_stores_260_bytes(tmp_path):
    model = get_peft_model(vit_b16_text(), qconfig(bits=1))
    model.save_pretrained(tmp_path / "q")
    tensors = load_file(tmp_path / "q" / "adapter_model.safetensors")
    assert sorted(k.rsplit(".", 1)[-1] for k in tensors) == ["ctx_codebook", "ctx_indices"]
    assert sum(t.numel() * t.element_size() for t in tensors.values()) == 260 == payload_bytes(2048, 1)
    codebook = next(t for k, t in tensors.items() if k.endswith("codebook"))
    assert codebook.dtype == torch.float16 and codebook.numel() == 2
    model.peft_config["default"].save_latents = True
    model.save_pretrained(tmp_path / "latents")
    tensors = load_file(tmp_path / "latents" / "adapter_model.safetensors")
    assert sum(t.numel() * t.element_size() for t in tensors.values()) == 260 + 4 * 2048


@pytest.mark.parametrize("save_latents", [False, True])
def test_q9_reload_in_fresh_process_is_exact(tmp_path, save_latents):
    model = get_peft_model(spec_clip(), qconfig(bits=2, save_latents=save_latents))
    train(model, 5)
    expected, prompt = logits(model), model.base_model.prompt_matrix()
    spec_clip().save_pretrained(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    save_file({"logits": expected.detach().contiguous(), "prompt": prompt, "ids": PROMPTS, "pixels": pixels()},
              tmp_path / "ref.st")
    script = (
        "import torch, peft_effadapt; from peft import PeftModel; from transformers import CLIPModel;"
        "from safetensors.torch import load_file; torch.set_num_threads(1);"
        f"m = PeftModel.from_pretrained(CLIPModel.from_pretrained(r'{tmp_path / 'base'}'), "
        f"r'{tmp_path / 'adapter'}').eval(); r = load_file(r'{tmp_path / 'ref.st'}');"
        "assert torch.equal(m.base_model.prompt_matrix(), r['prompt']);"
        "out = m(input_ids=r['ids'], pixel_values=r['pixels']).logits_per_image;"
        "assert (out - r['logits']).abs().max() < 1e-6, (out - r['logits']).abs().max()"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_reloaded_adapter_continues_training(tmp_path):
    model = get_peft_model(spec_clip(), qconfig(bits=1))
    train(model, 3)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(spec_clip(), tmp_path, is_trainable=True)
    assert_fp32_close(logits(reloaded), logits(model))
    train(reloaded, 3, lr=0.5)
    assert torch.unique(reloaded.base_model.prompt_matrix()).numel() <= 2


@pytest.mark.parametrize("quantizer", ["uniform", "noise"])
def test_baselines(quantizer, tmp_path):
    model = get_peft_model(spec_clip(), qconfig(quantizer=quantizer, bits=2, noise_std=0.5))
    model.eval()
    torch.testing.assert_close(logits(model), logits(model), rtol=0, atol=0)
    if quantizer == "noise":  # noise only in training; eval = the latent (= the hard prompt at init)
        assert_fp32_close(logits(model), logits(spec_clip(), HARD))
        model.train()
        assert not torch.allclose(logits(model), logits(model))
    else:
        assert torch.unique(model.base_model.prompt_matrix()).numel() <= 4
    model.eval()
    expected = logits(model)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(spec_clip(), tmp_path).eval()
    assert_fp32_close(logits(reloaded), expected)


@pytest.mark.parametrize("host", ["coop", "rlp", "maple"])
def test_reload_without_latents_reports_no_missing_keys(tmp_path, host):
    """Latents are not saved by design: peft must not warn about them, and the load is still exact."""
    import warnings

    extra = dict(rlp_rank=1) if host == "rlp" else dict(prompt_depth=2) if host == "maple" else {}
    model = get_peft_model(spec_clip(), qconfig(host=host, bits=2, **extra))
    train(model, 3)
    expected = logits(model.eval())
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reloaded = PeftModel.from_pretrained(spec_clip(), tmp_path).eval()
        result = reloaded.load_adapter(tmp_path, adapter_name="again")
    assert result.missing_keys == [] or not any(".again." in k for k in result.missing_keys), result.missing_keys
    torch.testing.assert_close(logits(reloaded), expected, rtol=0, atol=1e-6)


# RLP host ------------------------------------------------------------------------------------------------------
def test_rlp_host_starts_as_zero_shot_and_stores_quantised_b(tmp_path):
    model = get_peft_model(spec_clip(), qconfig(host="rlp", bits=1, rlp_rank=1))
    assert_fp32_close(logits(model), logits(spec_clip(), HARD))  # A = 0
    train(model, 5)
    prompt = model.base_model.prompt_matrix()
    p0 = spec_clip().text_model.embeddings.token_embedding.weight[CTX_IDS]
    assert torch.linalg.matrix_rank(prompt - p0) <= 1
    tensors = layer_of(model).tensors("default")
    assert torch.unique(tensors.value("B", False).detach()).numel() <= 2
    model.save_pretrained(tmp_path)
    stored = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(k.rsplit(".", 1)[-1] for k in stored) == ["A", "B_codebook", "B_indices"]
    assert sum(t.numel() * t.element_size() for t in stored.values()) == 4 * 4 + payload_bytes(32, 1)


# MaPLe host (Q8) -----------------------------------------------------------------------------------------------
def test_q8_maple_counts_and_vision_sequence():
    depth, m, dt, dv = 2, 2, 32, 48
    model = get_peft_model(spec_clip(), qconfig(host="maple", bits=4, prompt_depth=depth))
    count = m * dt + (dt * dv + dv) + (depth - 1) * m * dt + (depth - 1) * (dt * dv + dv)
    assert model.get_nb_trainable_parameters()[0] == count
    seen = []
    vision = model.base_model.model.vision_model
    handle = vision.encoder.layers[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    out = model(input_ids=PROMPTS, pixel_values=pixels())
    handle.remove()
    assert seen == [1 + 16 + m]
    assert out.image_embeds.shape == (4, 16)
    assert not torch.allclose(out.logits_per_image, logits(spec_clip(), HARD), atol=1e-4)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, HARD), logits(spec_clip(), HARD), rtol=0, atol=0)


def test_q8_maple_depth_one_has_no_deep_prompts_and_fixed_words_stay():
    model = get_peft_model(spec_clip(), qconfig(host="maple", prompt_depth=1))
    names = layer_of(model).tensors("default").names
    assert names == ["ctx", "proj_weight", "proj_bias"]
    # the first maple_n_ctx rows are learned, the rest are the fixed token embeddings of ctx_init ("of a")
    p0 = spec_clip().text_model.embeddings.token_embedding.weight[CTX_IDS]
    torch.testing.assert_close(model.base_model.prompt_matrix()[2:], p0[2:], rtol=0, atol=0)


def test_q8_deep_text_prompts_touch_only_prompt_rows():
    model = get_peft_model(spec_clip(), qconfig(host="maple", prompt_depth=2, init_weights=False))
    text = lambda m, ids: m.get_text_features(input_ids=ids).pooler_output  # noqa: E731
    torch.testing.assert_close(text(model, HARD), text(spec_clip(), HARD), rtol=0, atol=0)
    mixed = torch.cat([PROMPTS, HARD])
    out = text(model, mixed)
    assert_fp32_close(out[3:], text(spec_clip(), HARD))
    assert_fp32_close(out[:3], text(model, PROMPTS))


def test_q8_maple_storage_adds_up_and_reloads(tmp_path):
    model = get_peft_model(spec_clip(), qconfig(host="maple", bits=4, prompt_depth=2))
    train(model, 3)
    expected = logits(model)
    model.save_pretrained(tmp_path)
    stored = load_file(tmp_path / "adapter_model.safetensors")
    quantised = {"ctx": 2 * 32, "proj_weight": 48 * 32, "deep_text_1": 2 * 32, "coupling_1_weight": 48 * 32}
    total = sum(payload_bytes(n, 4) for n in quantised.values()) + 2 * 48 * 4  # + two fp32 bias vectors
    assert sum(t.numel() * t.element_size() for t in stored.values()) == total
    reloaded = PeftModel.from_pretrained(spec_clip(), tmp_path).eval()
    assert_fp32_close(logits(reloaded), expected)
    with pytest.raises(ValueError, match="MaPLe"):
        reloaded.merge_and_unload()
    unloaded = reloaded.unload()
    torch.testing.assert_close(logits(unloaded, HARD), logits(spec_clip(), HARD), rtol=0, atol=0)


# bad input -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=0), "bits"), (dict(bits=9), "bits"), (dict(bits=None), "bits"), (dict(bits=2.5), "bits"),
    (dict(quantize_tensors=[]), "quantize_tensors"), (dict(host="vpt"), "vpt"), (dict(quantizer="lsq"), "lsq"),
    (dict(refit="sometimes"), "sometimes"), (dict(csc=True, num_classes=3), "csc"),
])
def test_bad_config_values_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        qconfig(**kwargs)


def test_selection_matching_nothing_is_rejected_and_model_untouched():
    clip = spec_clip()
    before = copy.deepcopy(clip)
    with pytest.raises(ValueError, match="selects"):
        get_peft_model(clip, qconfig(quantize_tensors=["deep_text_*"]))
    assert str(clip) == str(before)


def test_model_without_prompts_is_rejected():
    with pytest.raises(ValueError, match="ViTForImageClassification"):
        get_peft_model(tiny_vit(), qconfig())
    torch.manual_seed(0)
    text_only = CLIPTextModel(spec_clip().config.text_config)
    with pytest.raises(ValueError, match="CLIPModel"):
        get_peft_model(text_only, qconfig(host="maple"))


@pytest.mark.parametrize("damage", ["short-indices", "bits-in-config"])
def test_packed_length_mismatch_loads_nothing(tmp_path, damage):
    model = get_peft_model(spec_clip(), qconfig(bits=1))
    model.save_pretrained(tmp_path)
    weights, config_file = tmp_path / "adapter_model.safetensors", tmp_path / "adapter_config.json"
    if damage == "short-indices":
        tensors = load_file(weights)
        key = next(k for k in tensors if k.endswith("ctx_indices"))
        tensors[key] = tensors[key][:-1].clone()
        save_file(tensors, weights)
    else:
        config_file.write_text(config_file.read_text().replace('"bits": 1', '"bits": 2'))
    fresh = spec_clip()
    snapshot = copy.deepcopy(fresh)
    with pytest.raises(ValueError, match="ctx_(indices|codebook)"):
        PeftModel.from_pretrained(fresh, tmp_path)
    assert str(fresh) == str(snapshot)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), snapshot.state_dict().values()))


def test_maple_tensor_read_by_both_towers_advances_cac_once_per_step():
    model = get_peft_model(spec_clip(), qconfig(host="maple", bits=2, prompt_depth=2))
    train(model, 3)
    quantizers = layer_of(model).tensors("default").quantizers
    assert quantizers["ctx"].schedule.step == 3 and quantizers["deep_text_1"].schedule.step == 3
