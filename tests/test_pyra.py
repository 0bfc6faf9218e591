"""PYRA's own equations and numbers (spec pyra.md §b.4, §b.5, §e)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch.utils.flop_counter import FlopCounterMode
from transformers import ViTForImageClassification

from peft_effadapt import PYRAConfig, ToMeConfig, pyra_param_groups
from peft_effadapt.testing import tiny_pixel_values, tiny_vit
from peft_effadapt.tuners.pyra import PYRABlock, PYRALayer, pyra_modulate

from fp32 import assert_fp32_close

VIT = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, image_size=64,
           patch_size=8)
SCHEDULE = [8, 8, 8, 6]


def vit(seed=0, **overrides):
    return tiny_vit(seed=seed, **{**VIT, **overrides})


def pixels(batch=3):
    return tiny_pixel_values(batch=batch, image_size=64)


def pyra(model=None, **config):
    config = {"merge_schedule": SCHEDULE, "lora_dropout": 0.0, **config}
    return get_peft_model(model if model is not None else vit(), PYRAConfig(**config)).eval()


def logits(model, x):
    with torch.no_grad():
        return model(pixel_values=x).logits


def blocks(model):
    return [m for m in model.modules() if isinstance(m, PYRALayer)]


def randomise_lora(model, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in blocks(model):
            b = block.pyra_lora_B["default"]
            b.copy_(torch.randn(b.shape, generator=generator) * 0.2)


# -- at init PYRA == LoRA + ToMe ------------------------------------------------------------------------------------
def test_at_init_pyra_equals_lora_plus_tome_bit_for_bit():
    x = pixels()
    model = pyra()
    randomise_lora(model)
    with_modulation = logits(model, x)
    for block in blocks(model):  # the same LoRA + ToMe forward with the modulation switched off
        block.modulation_fn = lambda name: None
    torch.testing.assert_close(with_modulation, logits(model, x), rtol=0, atol=0)


def test_lora_plus_tome_matches_peft_lora_merged_then_tome():
    """An independent LoRA + ToMe: peft's own LoRA (separate A per projection, alpha = r → scale 1) merged into the
    weights, then our ToMe; PYRA at init (unshared A) with the same LoRA weights gives the same logits."""
    x = pixels()
    model = pyra(lora_r=4, lora_shared_qkv_a=False)
    randomise_lora(model)
    lora = get_peft_model(vit(), LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj"]))
    with torch.no_grad():
        for i, block in enumerate(blocks(model)):
            a_parts = block.pyra_lora_A["default"].chunk(3, 0)
            b_parts = block.pyra_lora_B["default"].chunk(3, 0)
            attention = lora.base_model.model.vit.layers[i].attention
            for proj, a, b in zip((attention.q_proj, attention.k_proj, attention.v_proj), a_parts, b_parts):
                proj.lora_A["default"].weight.copy_(a)
                proj.lora_B["default"].weight.copy_(b)
    reference = get_peft_model(lora.merge_and_unload(), ToMeConfig(merge_schedule=SCHEDULE)).eval()
    assert_fp32_close(logits(model, x), logits(reference, x))


def test_nonzero_w_d_changes_logits():
    x = pixels()
    model = pyra()
    before = logits(model, x)
    with torch.no_grad():
        blocks(model)[0].pyra_w_d["default"].normal_()
    assert not torch.allclose(logits(model, x), before, atol=1e-4)


def test_only_w_d_gets_gradient_at_init_and_last_block_gets_none():
    model = pyra(modules_to_save=["classifier"])
    model.train()
    model(pixel_values=pixels()).logits.pow(2).sum().backward()
    merging = blocks(model)
    for i, block in enumerate(merging):
        w_d = block.pyra_w_d["default"].grad
        assert block.pyra_w_r["default"].grad is None or not block.pyra_w_r["default"].grad.any()
        norm = block.pyra_norm["default"]
        assert all(p.grad is None or not p.grad.any() for p in norm.parameters())
        if i < len(merging) - 1:
            assert w_d is not None and w_d.abs().sum() > 0, f"block {i}"
        else:
            assert w_d is None or not w_d.any()  # the MLP after the last merge is token-wise; CLS head only
    assert all(block.pyra_lora_B["default"].grad.abs().sum() > 0 for block in merging)


def test_modulation_formula():
    torch.manual_seed(0)
    src, dst = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, 5, 8, dtype=torch.float64)
    w_r, w_d = torch.rand(5, 1, dtype=torch.float64) * 2 - 1, torch.randn(1, 8, dtype=torch.float64)
    weight, bias = torch.rand(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    out = pyra_modulate(src, dst, w_r, w_d, weight, bias, 1e-5)
    for b in range(2):
        m = torch.nn.functional.layer_norm(src[b] + dst[b], (8,), weight, bias, 1e-5)
        channel = 2 * torch.sigmoid((w_r * m).sum(0))  # D: mixes the pair ranks
        for k in range(5):
            token = 2 * torch.sigmoid((m[k] * w_d[0]).sum()) - 1
            torch.testing.assert_close(out[b, k], src[b, k] * (1 + channel * token), rtol=0, atol=1e-12)
    # rows packed with the merged size ([s·x, s], as merge_wavg passes them): the size passes unchanged
    size = torch.rand(2, 5, 1, dtype=torch.float64) + 1
    packed = pyra_modulate(torch.cat([src, size], -1), torch.cat([dst, size + 1], -1), w_r, w_d, weight, bias, 1e-5)
    torch.testing.assert_close(packed[..., :8], out, rtol=0, atol=1e-12)
    assert torch.equal(packed[..., 8:], size)


def test_shapes_follow_the_schedule_and_init():
    model = pyra(merge_schedule=[8, 0, 8, 6], lora_r=8)
    merging = blocks(model)
    assert [tuple(b.pyra_w_r["default"].shape) if "default" in b.pyra_w_r else None for b in merging] == [
        (8, 1), None, (8, 1), (6, 1)]
    first = merging[0]
    assert first.pyra_lora_A["default"].shape == (8, 64) and first.pyra_lora_B["default"].shape == (192, 8)
    assert not first.pyra_w_d["default"].any() and not first.pyra_lora_B["default"].any()
    assert first.pyra_w_r["default"].abs().max() <= 1
    trainable, _ = model.get_nb_trainable_parameters()
    lora = 4 * (8 * 64 + 192 * 8)
    modulation = (8 + 8 + 6) + 3 * 64 + 3 * 2 * 64
    assert trainable == lora + modulation
    model(pixel_values=pixels())
    assert model.base_model.token_counts() == [65, 57, 57, 49, 43]


def test_all_zero_schedule_equals_base_and_has_no_modulation():
    x = pixels()
    model = pyra(merge_schedule=0)
    assert not any(len(b.pyra_w_r) for b in blocks(model))
    torch.testing.assert_close(logits(model, x), logits(vit(), x), rtol=0, atol=0)


def test_batch_independence():
    model = pyra(init_weights=False)
    x = pixels()
    y = x.clone()
    y[2] = torch.randn_like(y[2])
    assert_fp32_close(logits(model, x)[:2], logits(model, y)[:2])


def test_eager_and_sdpa_agree():
    x = pixels()
    eager, sdpa = (pyra(vit(attn_implementation=impl), init_weights=False) for impl in ("eager", "sdpa"))
    assert_fp32_close(logits(eager, x), logits(sdpa, x))


def test_modulation_adds_no_matmul_flops():
    """PYRA's 4·r·D multiply-adds per merging block are broadcast multiply-and-sums (test_modulation_formula checks
    them against the two products of the paper), which FlopCounterMode does not count: the deployed PYRA has
    exactly the matmul FLOPs of ToMe with the same schedule (nothing bigger is hidden in the modulation)."""
    x = pixels(1)

    def flops(model):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(pixel_values=x)
        return counter.get_total_flops()

    tome_flops = flops(get_peft_model(vit(attn_implementation="eager"), ToMeConfig(merge_schedule=SCHEDULE)))
    model = pyra(vit(attn_implementation="eager"), init_weights=False)
    model = model.merge_and_unload()  # LoRA folded: what is deployed
    assert flops(model) == tome_flops


def test_merge_and_unload_folds_lora_and_keeps_the_modulation():
    x = pixels()
    model = pyra(init_weights=False, modules_to_save=["classifier"])
    expected = logits(model, x)
    keys = set(vit().state_dict())
    merged = model.merge_and_unload()
    assert set(merged.state_dict()) == keys
    assert type(merged.vit.layers[0]).__name__ == "TokenMergingViTLayer"
    assert hasattr(merged.vit.layers[0], "token_merge_modulation")
    assert_fp32_close(logits(merged, x), expected)
    assert not any(isinstance(m, PYRABlock) for m in merged.modules())


def test_gradient_checkpointing_recomputes_with_the_same_state():
    x = pixels()
    calls = []

    def grads(checkpointing):
        model = pyra(init_weights=False)
        if checkpointing:
            model.base_model.model.gradient_checkpointing_enable({"use_reentrant": False})
        block = blocks(model)[2]
        block.register_forward_pre_hook(lambda *args: calls.append(checkpointing))
        original = block.merging_forward

        def counting(*args, **kwargs):
            calls.append(("body", checkpointing))
            return original(*args, **kwargs)

        block.merging_forward = counting
        model.train()
        model(pixel_values=x).logits.pow(2).sum().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert calls.count(("body", True)) == 2 and calls.count(("body", False)) == 1  # recomputed once in backward
    for name in plain:
        assert_fp32_close(checkpointed[name], plain[name], msg=name)


def test_save_load_round_trip_in_process(tmp_path):
    x = pixels()
    model = pyra(init_weights=False, modules_to_save=["classifier"])
    expected = logits(model, x)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(vit(), tmp_path, is_trainable=True).eval()
    torch.testing.assert_close(logits(reloaded, x), expected, rtol=0, atol=0)
    # frozen tensors take another CPU matmul path (requires_grad changes kernel choice): equal up to rounding
    frozen = PeftModel.from_pretrained(vit(), tmp_path).eval()
    assert_fp32_close(logits(frozen, x), expected)
    assert reloaded.peft_config["default"].layer_schedule == SCHEDULE


def test_other_resolution_is_refused(tmp_path):
    pyra(init_weights=False).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="made for 65 input tokens"):
        PeftModel.from_pretrained(vit(image_size=32), tmp_path)
    model = pyra()
    with pytest.raises(ValueError, match=r"layer 1 \(vit.layers.1\) is scheduled to merge r=8 tokens, but only 9 tokens reach it"):
        model(pixel_values=tiny_pixel_values(batch=1, image_size=32), interpolate_pos_encoding=True)


def test_schedule_over_the_50_percent_rule_raises():
    with pytest.raises(ValueError, match=r"layer 3 \(vit.layers.3\), but only 17 tokens enter that layer"):
        pyra(merge_schedule=[16, 16, 16, 10])


def test_param_groups_use_pyra_lr():
    model = pyra(pyra_lr=1e-4, modules_to_save=["classifier"])
    groups = pyra_param_groups(model, lr=1e-3, weight_decay=1e-4)
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())
    pyra_ids = {id(p) for b in blocks(model) for c in (b.pyra_w_r, b.pyra_w_d) for p in c.values()}
    for group in groups:
        for p in group["params"]:
            if id(p) in pyra_ids:
                assert group["lr"] == 1e-4
        assert group["weight_decay"] == 0.0 or all(p.ndim > 1 for p in group["params"])
    torch.optim.AdamW(groups)


@pytest.mark.parametrize("bad", [dict(lora_r=0), dict(lora_dropout=1.0), dict(pyra_layernorm_eps=0),
                                 dict(lora_shared_qkv_a="yes"), dict(pyra_lr=-1.0)])
def test_bad_config_values_are_named(bad):
    key = next(iter(bad))
    with pytest.raises(ValueError, match=key):
        PYRAConfig(**bad)


def test_subclass_of_vit_for_image_classification_is_accepted():
    class UserViTForImageClassification(ViTForImageClassification):
        pass

    base = vit()
    user = UserViTForImageClassification(base.config)
    user.load_state_dict(base.state_dict())
    x = pixels()
    expected, model = pyra(base, init_weights=False), pyra(user.eval(), init_weights=False)
    model.load_state_dict(expected.state_dict())
    torch.testing.assert_close(logits(model, x), logits(expected, x), rtol=0, atol=0)
    assert len(blocks(model)) == 4

