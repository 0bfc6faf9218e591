"""RLP's own equations and numbers (spec rlp.md §e, T1-T10, plus bad input)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import CLIPConfig, CLIPModel

from peft_effadapt import RLPConfig
from peft_effadapt.testing import tiny_pixel_values, tiny_vit

from fp32 import assert_fp32_close

BOS, EOS, PLACEHOLDER, DOT = 98, 99, 7, 5
CTX_IDS = [10, 11, 12, 13]
CLASS_IDS = [[20], [21, 22], [23, 24, 25]]


def spec_config(eos_token_id=EOS) -> CLIPConfig:
    return CLIPConfig(
        text_config=dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, bos_token_id=BOS,
                         eos_token_id=eos_token_id, pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )


def spec_clip(eos_token_id=EOS) -> CLIPModel:
    torch.manual_seed(0)
    return CLIPModel(spec_config(eos_token_id)).eval()


def rows(ctx, pad=0, length=None, classes=CLASS_IDS):
    seqs = [[BOS] + list(ctx) + c + [DOT, EOS] for c in classes]
    length = length or max(map(len, seqs))
    ids = torch.full((len(seqs), length), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    return ids


PROMPTS = rows([PLACEHOLDER] * 4)
ZERO_SHOT = rows(CTX_IDS)
PIXELS = tiny_pixel_values(batch=6)


def rlp(**kw):
    kw.setdefault("ctx_init_token_ids", CTX_IDS)
    kw.setdefault("placeholder_token_id", PLACEHOLDER)
    return RLPConfig(**kw)


def logits(model, ids=PROMPTS, pixels=PIXELS):
    return model(input_ids=ids, pixel_values=pixels).logits_per_image


def layer_of(model):
    return model.base_model.prompt_layer()


def randomise(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "rlp_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


# T1 ------------------------------------------------------------------------------------------------------------
def test_t1_count_tiny():
    model = get_peft_model(spec_clip(), rlp())
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert sum(trainable.values()) == 4 * 1 + 1 * 32 == 36
    assert all("rlp_" in n for n in trainable)
    assert not model.base_model.model.logit_scale.requires_grad


@pytest.mark.parametrize("rank,count", [(1, 516), (2, 1032), (4, 2064)])
def test_t1_count_vit_b16_shaped(rank, count):
    """ViT-B/16 CLIP config (text width 512, 77 positions, 49408 tokens; vision 768 wide, patch 16), on the meta
    device so that no 150M weights are allocated."""
    with torch.device("meta"):
        clip = CLIPModel(CLIPConfig(vision_config=dict(patch_size=16)))
    assert clip.config.text_config.hidden_size == 512 and clip.config.vision_config.hidden_size == 768
    model = get_peft_model(clip, RLPConfig(ctx_init_token_ids=[320, 1125, 539, 320], placeholder_token_id=343,
                                           rank=rank))
    assert model.get_nb_trainable_parameters()[0] == count


# T2 ------------------------------------------------------------------------------------------------------------
def test_t2_zero_init_equals_zero_shot_clip():
    expected = logits(spec_clip(), ZERO_SHOT)
    model = get_peft_model(spec_clip(), rlp(init="zero")).eval()
    assert_fp32_close(logits(model), expected)


def test_t2_svd_init_equals_zero_shot_clip():
    expected = logits(spec_clip(), ZERO_SHOT)
    model = get_peft_model(spec_clip(), rlp(init="svd", rank=2)).eval()
    assert_fp32_close(logits(model), expected)


# T3 ------------------------------------------------------------------------------------------------------------
def spec_prompt_matrix(model, init, rank):
    """P* = F + A·B of spec b.3/b.4 from the model's trained factors and the base CLIP's own token embeddings: the
    frozen path F is P0 (init "zero"/"random") or the SVD residual P0 − U_r·S_r·V_rᵀ (init "svd")."""
    params = dict(model.named_parameters())
    a, b = (next(p for name, p in params.items() if f"rlp_{f}." in name).detach() for f in "AB")
    p0 = spec_clip().text_model.embeddings.token_embedding.weight[CTX_IDS].detach()
    frozen = p0
    if init == "svd":
        u, s, vh = torch.linalg.svd(p0, full_matrices=False)
        frozen = p0 - u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
    return frozen + a @ b


@pytest.mark.parametrize("init", ["zero", "svd", "random"])
def test_t3_training_form_equals_collapsed_and_merged(init):
    model = get_peft_model(spec_clip(), rlp(init=init, rank=2, lowrank_dropout=0.3))
    randomise(model)
    model.eval()
    expected = logits(model)
    assert_fp32_close(model.base_model.prompt_matrix(), spec_prompt_matrix(model, init, rank=2))
    merged = model.merge_and_unload()
    assert type(merged) is CLIPModel
    assert_fp32_close(logits(merged), expected)


# T4 ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_t4_rank(rank):
    model = get_peft_model(spec_clip(), rlp(rank=rank))
    randomise(model)
    layer = layer_of(model)
    p0 = spec_clip().text_model.embeddings.token_embedding.weight[CTX_IDS]
    delta = model.base_model.prompt_matrix() - p0
    assert torch.linalg.matrix_rank(layer.low_rank_delta("default").detach()) <= rank
    assert torch.linalg.matrix_rank(delta) <= rank
    pure = get_peft_model(spec_clip(), rlp(rank=rank, use_init_path=False))
    randomise(pure)
    assert torch.linalg.matrix_rank(pure.base_model.prompt_matrix()) <= rank


def test_t4_pure_low_rank_starts_at_truncated_svd_of_p0():
    model = get_peft_model(spec_clip(), rlp(rank=4, use_init_path=False))
    p0 = spec_clip().text_model.embeddings.token_embedding.weight[CTX_IDS]
    assert_fp32_close(model.base_model.prompt_matrix(), p0)  # rank 4 = n: exact


# T5 ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["element", "branch"])
def test_t5_dropout_only_in_training(mode):
    model = get_peft_model(spec_clip(), rlp(lowrank_dropout=0.5, dropout_mode=mode))
    randomise(model)
    model.train()
    torch.manual_seed(0)
    outs = [logits(model) for _ in range(6)]
    assert any(not torch.allclose(outs[0], o) for o in outs[1:])
    model.eval()
    torch.testing.assert_close(logits(model), logits(model), rtol=0, atol=0)


def test_t5_no_dropout_train_equals_eval():
    model = get_peft_model(spec_clip(), rlp(lowrank_dropout=0.0))
    randomise(model)
    model.train()
    train_out = logits(model)
    model.eval()
    torch.testing.assert_close(train_out, logits(model), rtol=0, atol=0)


# T6 ------------------------------------------------------------------------------------------------------------
def test_t6_gradients():
    model = get_peft_model(spec_clip(), rlp(init="zero", lowrank_dropout=0.0))
    model.train()
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    layer = layer_of(model)
    a, b = layer.rlp_A["default"], layer.rlp_B["default"]
    loss = torch.nn.functional.cross_entropy(logits(model), labels)
    loss.backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
    assert b.grad is not None and b.grad.abs().sum() == 0
    optimizer = torch.optim.SGD([a, b], lr=0.1)
    optimizer.step()
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(logits(model), labels).backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        if "rlp_" not in name:
            assert p.grad is None, name


# T7 ------------------------------------------------------------------------------------------------------------
def text_features(model, ids):
    return model.get_text_features(input_ids=ids).pooler_output


def test_t7_pooling_paths_agree():
    model = get_peft_model(spec_clip(), rlp())
    randomise(model)
    legacy = get_peft_model(spec_clip(eos_token_id=2), rlp())
    randomise(legacy)  # same seed: same factors
    expected = text_features(model, PROMPTS)
    assert_fp32_close(text_features(legacy, PROMPTS), expected)
    assert_fp32_close(text_features(model, rows([PLACEHOLDER] * 4, pad=EOS)), expected)


def test_t7b_placeholder_equal_to_eot_breaks_argmax_pooling():
    """Documents pitfall 2: on the legacy argmax path a context slot holding the EOT id moves the pooling index."""
    legacy = get_peft_model(spec_clip(eos_token_id=2), rlp(placeholder_token_id=EOS))
    good = get_peft_model(spec_clip(eos_token_id=2), rlp())
    bad_rows, good_rows = rows([EOS] * 4), PROMPTS
    assert not torch.allclose(text_features(legacy, bad_rows), text_features(good, good_rows), atol=1e-4)


# T8 ------------------------------------------------------------------------------------------------------------
def test_t8_save_stores_only_factors_and_reloads(tmp_path):
    model = get_peft_model(spec_clip(), rlp())
    randomise(model)
    model.eval()
    expected = logits(model)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(k.rsplit(".", 1)[-1] for k in tensors) == ["rlp_A", "rlp_B"]
    assert sum(t.numel() for t in tensors.values()) == 36
    reloaded = PeftModel.from_pretrained(spec_clip(), tmp_path).eval()
    torch.testing.assert_close(logits(reloaded), expected, rtol=0, atol=0)
    novel = rows([PLACEHOLDER] * 4, classes=[[30, 31], [32], [33, 34, 35], [36]])
    assert logits(reloaded, novel).shape == (6, 4)


def test_t8_fresh_process_reload(tmp_path):
    model = get_peft_model(spec_clip(), rlp(init="svd", rank=2))
    randomise(model)
    model.eval()
    expected = logits(model)
    spec_clip().save_pretrained(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    torch.save(expected, tmp_path / "expected.pt")
    torch.save({"ids": PROMPTS, "pixels": PIXELS}, tmp_path / "inputs.pt")
    script = (
        "import torch, peft_effadapt; from peft import PeftModel; from transformers import CLIPModel;"
        "torch.set_num_threads(1);"
        f"m = PeftModel.from_pretrained(CLIPModel.from_pretrained(r'{tmp_path / 'base'}'), r'{tmp_path / 'adapter'}');"
        f"x = torch.load(r'{tmp_path / 'inputs.pt'}'); e = torch.load(r'{tmp_path / 'expected.pt'}');"
        "out = m.eval()(input_ids=x['ids'], pixel_values=x['pixels']).logits_per_image;"
        "assert (out - e).abs().max() < 1e-6, (out - e).abs().max()"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


# T9 ------------------------------------------------------------------------------------------------------------
def test_t9_padding_invariance():
    model = get_peft_model(spec_clip(), rlp())
    randomise(model)
    model.eval()
    assert_fp32_close(logits(model, rows([PLACEHOLDER] * 4, length=16)), logits(model))


# T10 -----------------------------------------------------------------------------------------------------------
def test_t10_smoke_training_lowers_loss():
    model = get_peft_model(spec_clip(), rlp(lowrank_dropout=0.1))
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    model.eval()
    with torch.no_grad():
        before = torch.nn.functional.cross_entropy(logits(model), labels).item()
    model.train()
    for _ in range(20):
        loss = torch.nn.functional.cross_entropy(logits(model), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        after = torch.nn.functional.cross_entropy(logits(model), labels).item()
    assert after < before, (before, after)


# Rows not in prompt format are untouched ----------------------------------------------------------------------------
def test_non_prompt_rows_are_left_alone():
    model = get_peft_model(spec_clip(), rlp())
    randomise(model)
    torch.testing.assert_close(logits(model, ZERO_SHOT), logits(spec_clip(), ZERO_SHOT), rtol=0, atol=0)


# Bad input -------------------------------------------------------------------------------------------------------
def test_model_without_text_tower_is_rejected():
    with pytest.raises(ValueError, match="ViTForImageClassification"):
        get_peft_model(tiny_vit(), rlp())


@pytest.mark.parametrize("kwargs,match", [
    (dict(rank=5), "rank=5"),
    (dict(rank=0), "rank"),
    (dict(n_ctx=0, ctx_init=None, ctx_init_token_ids=None), "n_ctx"),
    (dict(n_ctx=3), "n_ctx=3"),
    (dict(init="orthogonal"), "orthogonal"),
    (dict(dropout_mode="path"), "path"),
    (dict(lowrank_dropout=1.0), "lowrank_dropout"),
    (dict(csc=True), "num_classes"),
    (dict(class_token_position="front"), "front"),
])
def test_bad_config_values_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rlp(**kwargs)


def test_rank_above_width_is_rejected_and_model_untouched():
    torch.manual_seed(0)
    config = spec_config()
    config.text_config.hidden_size, config.text_config.num_attention_heads = 8, 2
    clip = CLIPModel(config)
    before = {k: v.clone() for k, v in clip.state_dict().items()}
    config = RLPConfig(ctx_init=None, n_ctx=10, rank=9, placeholder_token_id=PLACEHOLDER)
    with pytest.raises(ValueError, match="min"):
        get_peft_model(clip, config)
    assert not any(type(m).__name__ == "RLPLayer" for m in clip.modules())
    assert all(torch.equal(v, clip.state_dict()[k]) for k, v in before.items())


def test_token_ids_outside_vocabulary_are_rejected():
    with pytest.raises(ValueError, match="vocabulary"):
        get_peft_model(spec_clip(), rlp(placeholder_token_id=500))


def test_missing_token_ids_without_tokenizer_explain_what_to_do():
    with pytest.raises(ValueError, match="resolve_tokens"):
        get_peft_model(spec_clip(), RLPConfig())
