"""Consolidator's own equations and numbers (spec consolidator.md §e, T1-T8, plus storage and training modes)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn
from transformers import ViTConfig, ViTModel

from peft_effadapt import ConsolidatorConfig
from peft_effadapt.testing import tiny_pixel_values, tiny_vit
from peft_effadapt.tuners.consolidator import BranchPattern, ConsolidatorLinear, shuffle_permutation, support_index

from fp32 import assert_fp32_close


def make_layer(d_in, d_out, groups, shuffle, rep_drop=0.0, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out).to(dtype)
    groups = groups if isinstance(groups, (list, tuple)) else [groups]
    shuffles = shuffle if isinstance(shuffle, (list, tuple)) else [shuffle] * len(groups)
    patterns = [BranchPattern(d_in, d_out, g, s) for g, s in zip(groups, shuffles)]
    layer = ConsolidatorLinear(
        base, "default", patterns=patterns, rep_drop=rep_drop, rep_bias=True, train_bias=True, init_range=0.5
    ).to(dtype)
    with torch.no_grad():
        layer.consolidator_bias["default"].uniform_(-0.5, 0.5)
    return layer


# T1 ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d_in,d_out,groups", [(8, 24, 4), (16, 48, (8, 4)), (32, 64, 16)])
@pytest.mark.parametrize("shuffle", [False, True])
def test_t1_branch_forward_equals_merged_linear(d_in, d_out, groups, shuffle):
    layer = make_layer(d_in, d_out, groups, shuffle).eval()
    x = torch.randn(3, 5, d_in, dtype=torch.float64)
    delta_w, delta_b = layer.delta_weight_and_bias("default")
    base = layer.base_layer
    expected = F.linear(x, base.weight + delta_w, base.bias + delta_b)
    assert_fp32_close(layer(x), expected)


# T2 ------------------------------------------------------------------------------------------------------------
def test_t2_shuffle_permutation_worked_example():
    assert shuffle_permutation(8, 4).tolist() == [0, 2, 4, 6, 1, 3, 5, 7]


@pytest.mark.parametrize("d_in,d_out,g", [(8, 24, 4), (16, 16, 8), (32, 64, 16), (768 // 16, 96, 12)])
@pytest.mark.parametrize("shuffle", [False, True])
def test_t2_official_recipe(d_in, d_out, g, shuffle):
    """Official forward: ShuffleNet view/transpose of the channels, then a grouped 1x1 conv; official dense matrix:
    block-diagonal columns viewed as (Dout, C/g, g), transposed and flattened."""
    layer = make_layer(d_in, d_out, g, shuffle).eval()
    values = layer.consolidator_branches["default"][0].weight  # [Dout, si]
    x = torch.randn(4, 7, d_in, dtype=torch.float64)
    tokens = x.transpose(1, 2)  # [B, C, N] as the official Conv1d sees them
    if shuffle:
        tokens = tokens.reshape(4, g, d_in // g, 7).transpose(1, 2).reshape(4, d_in, 7)
    official = F.conv1d(tokens, values.unsqueeze(-1), groups=g).transpose(1, 2)
    branch = layer.consolidator_branches["default"][0]
    ours = branch(x) if branch.bias is None else branch(x) - branch.bias
    assert_fp32_close(ours, official)

    block_diagonal = torch.block_diag(*values.view(g, d_out // g, d_in // g))  # [Dout, Din] in shuffled order
    official_dense = block_diagonal
    if shuffle:
        official_dense = block_diagonal.view(d_out, d_in // g, g).transpose(1, 2).reshape(d_out, d_in)
    assert torch.equal(branch.dense_weight() != 0, official_dense != 0)
    assert (branch.dense_weight() - official_dense).abs().max() < 1e-12


# T3 ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "d_in,d_out,groups,shuffle,count",
    [(16, 48, (8, 4), False, 192), (16, 48, (8, 4), True, 264), (16, 16, (2, 8), False, 128),
     (16, 16, (2, 8), True, 144), (768, 768, (384,), False, 768 * 768 // 384)],
)
def test_t3_stored_value_counts(d_in, d_out, groups, shuffle, count):
    patterns = [BranchPattern(d_in, d_out, g, shuffle) for g in groups]
    assert support_index(patterns).numel() == count


# T4 ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("qkv_grouping", ["fused", "separate"])
def test_t4_vit_merge_and_unmerge(qkv_grouping):
    model = get_peft_model(tiny_vit(), ConsolidatorConfig(fc_groups=[16], qkv_grouping=qkv_grouping,
                                                          modules_to_save=["classifier"]))
    x = tiny_pixel_values(batch=4)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(pixel_values=x, labels=torch.tensor([0, 1, 2, 3])).loss.backward()
    optimizer.step()
    model.eval()
    expected = model(pixel_values=x).logits
    base_weight = tiny_vit().vit.layers[0].attention.q_proj.weight
    model.merge_adapter()
    assert_fp32_close(model(pixel_values=x).logits, expected)
    model.unmerge_adapter()
    restored = model.base_model.model.vit.layers[0].attention.q_proj.base_layer.weight
    assert_fp32_close(restored, base_weight)
    merged = model.merge_and_unload()
    assert_fp32_close(merged(pixel_values=x).logits, expected)


def test_fused_qkv_connectivity_follows_timm_rows():
    """Fused mode: with 3 | g, the q rows of the virtual 24 -> 72 layer read only the first third of the inputs."""
    model = get_peft_model(
        tiny_vit(hidden_size=24, num_attention_heads=4, intermediate_size=48),
        ConsolidatorConfig(fc_groups=[12], qkv_grouping="fused"),
    )
    attention = model.base_model.model.vit.layers[0].attention
    for index, name in enumerate(["q_proj", "k_proj", "v_proj"]):
        pattern = getattr(attention, name).consolidator_patterns["default"][0]
        read = set(pattern.columns().flatten().tolist())
        assert read == set(range(8 * index, 8 * (index + 1))), name
        assert getattr(attention, name).consolidator_branches["default"][0].aligned


def test_fused_qkv_straddling_groups_use_masked_dense_delta():
    """Tiny widths: with g=16 on hidden 32 a fused group has 6 rows, which straddle the q/k boundary."""
    model = get_peft_model(tiny_vit(), ConsolidatorConfig(fc_groups=[16], qkv_grouping="fused"))
    q_proj = model.base_model.model.vit.layers[0].attention.q_proj
    branch = q_proj.consolidator_branches["default"][0]
    assert not branch.aligned
    assert branch.weight.numel() == 32 * 2  # every row keeps si = 2 connections
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(branch(x), F.linear(x, branch.dense_weight(), branch.bias))


# T5 ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("qkv_grouping", ["fused", "separate"])
def test_t5_payload_of_tiny_vit(qkv_grouping, tmp_path):
    model = get_peft_model(tiny_vit(), ConsolidatorConfig(fc_groups=[16], qkv_grouping=qkv_grouping,
                                                          modules_to_save=["classifier"]))
    model.consolidate()  # the shipped form: ΔW's values on the support and one Δb per layer
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    sizes = {"delta": 0, "bias": 0, "layernorm": 0, "classifier": 0}
    for key, value in tensors.items():
        if key.endswith("consolidator_delta"):
            sizes["delta"] += value.numel()
        elif key.endswith("consolidator_bias"):
            sizes["bias"] += value.numel()
        elif "layernorm" in key:
            sizes["layernorm"] += value.numel()
        elif "classifier" in key:
            sizes["classifier"] += value.numel()
        else:
            raise AssertionError(f"unexpected tensor {key}")
    assert sizes == {"delta": 1024, "bias": 448, "layernorm": 320, "classifier": 165}
    assert all(v.dtype == torch.float32 for v in tensors.values())


def test_consolidated_reload_with_is_trainable_trains_the_delta(tmp_path):
    """A shipped (consolidated) adapter loaded with is_trainable=True trains its delta values and Δb; frozen otherwise."""
    model = get_peft_model(tiny_vit(), ConsolidatorConfig(fc_groups=[16], init_weights=False))
    model.consolidate()
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_vit(), tmp_path, is_trainable=True)
    fc1 = reloaded.base_model.model.vit.layers[0].mlp.fc1
    assert "default" not in fc1.consolidator_branches and "default" in fc1.consolidator_delta
    params = [p for n, p in reloaded.named_parameters() if "consolidator_" in n]
    assert params and all(p.requires_grad for p in params)
    reloaded.train()
    reloaded(pixel_values=tiny_pixel_values(), labels=torch.tensor([0, 1])).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    frozen = PeftModel.from_pretrained(tiny_vit(), tmp_path)
    assert frozen.get_nb_trainable_parameters()[0] == 0


# T6 ------------------------------------------------------------------------------------------------------------
def test_t6_vit_b16_parameter_count():
    torch.manual_seed(0)
    vit_b = ViTModel(ViTConfig(), add_pooling_layer=False)
    backbone = sum(p.numel() for p in vit_b.parameters())
    assert backbone == 85_798_656
    model = get_peft_model(vit_b, ConsolidatorConfig())  # default: one branch, hidden_size // 2 = 384 groups
    weights = biases = bias_deltas = 0
    for name, param in model.named_parameters():
        if "consolidator_branches" in name:
            weights += param.numel() * name.endswith("weight")
            biases += param.numel() * name.endswith("bias")
        elif "consolidator_bias" in name:  # the tuned bias of the Linear itself (official: fc_origin.bias)
            bias_deltas += param.numel()
    assert (weights, biases, bias_deltas) == (221_184, 82_944, 82_944)
    assert round(100 * (weights + biases) / backbone, 4) == 0.3545
    # spec b.7: what a consolidated ViT-B/16 checkpoint stores without a head: 342,528 values = 1,370,112 B fp32
    stored = 0
    for _, module in model.named_modules():
        if hasattr(module, "consolidator_support"):
            stored += module.consolidator_support["default"].numel() + module.out_features
        elif isinstance(module, nn.LayerNorm) and module.weight.requires_grad:
            stored += module.weight.numel() + module.bias.numel()
    assert stored == 342_528


def test_trainable_count_and_bias_step_follow_the_official_parametrisation():
    """As in THU-MIG/Consolidator, the Linear's bias (there fc_origin.bias, here a delta on the frozen bias) and every
    branch's bias are separate trainable vectors: one SGD step moves a layer's effective bias by (1 + branches) steps
    of its gradient, and the trainable count equals the official module's on the same ViT."""
    layer = make_layer(16, 32, [8, 4], False)  # fp64, no DropPath
    params = [p for n, p in layer.named_parameters() if "consolidator_" in n]
    assert sum(p.numel() for p in params) == 32 * 2 + 32 * 4 + 3 * 32  # branch weights, 2 branch biases, bias delta
    x, t = torch.randn(3, 5, 16, dtype=torch.float64), torch.randn(3, 5, 32, dtype=torch.float64)
    before = layer.delta_weight_and_bias("default")[1].detach().clone()
    layer.train()
    (layer(x) * t).sum().backward()
    with torch.no_grad():
        for param in params:
            param -= 0.1 * param.grad
    step = layer.delta_weight_and_bias("default")[1] - before
    assert_fp32_close(step, -3 * 0.1 * t.sum(dim=(0, 1)))  # dLoss/d(bias) = t summed over tokens, three times

    # tiny ViT, fc_groups=[2, 1]: the official VisionTransformer (embed 32, depth 2, mlp_ratio 2, 5 classes) trains
    # 26,405 values: branch weights 2 * 8,192 / 2 + 2 * 8,192, branch biases 2 * 448, block biases 448, LayerNorms
    # 320 and the head 165
    model = get_peft_model(tiny_vit(), ConsolidatorConfig(fc_groups=[2, 1], modules_to_save=["classifier"]))
    assert model.get_nb_trainable_parameters()[0] == 8_192 + 16_384 + 896 + 448 + 320 + 165 == 26_405


# T7 ------------------------------------------------------------------------------------------------------------
def test_t7_droppath_is_per_sample_and_per_branch():
    layer = make_layer(16, 32, [8, 4], False, rep_drop=0.5, dtype=torch.float32)
    del layer.consolidator_bias["default"]  # leave only the branches' own contributions
    x = torch.randn(64, 3, 16)
    base = layer.base_layer(x)
    branches = layer.consolidator_branches["default"]
    eval_parts = [branch(x) for branch in branches]
    layer.train()
    torch.manual_seed(1)
    contribution = layer(x) - base
    kept_patterns = set()
    for s in range(64):
        matches = []
        for combo in [(0, 0), (2, 0), (0, 2), (2, 2)]:
            candidate = combo[0] * eval_parts[0][s] + combo[1] * eval_parts[1][s]
            if torch.allclose(contribution[s], candidate, atol=1e-5):
                matches.append(combo)
        assert len(matches) == 1, f"sample {s}: branch output is not 0 or 2x its eval value per branch"
        kept_patterns.add(matches[0])
    assert kept_patterns == {(0, 0), (2, 0), (0, 2), (2, 2)}  # independent draws per branch
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))
    torch.testing.assert_close(layer(x) - base, eval_parts[0] + eval_parts[1])


# T8 ------------------------------------------------------------------------------------------------------------
def test_t8_zero_init_gives_base_outputs_exactly():
    x = tiny_pixel_values()
    base = tiny_vit()(pixel_values=x).logits
    model = get_peft_model(tiny_vit(), ConsolidatorConfig(fc_groups=[16], init_range=0.0))
    assert torch.equal(model(pixel_values=x).logits, base)


def test_t8_bad_group_count_names_the_layer_and_leaves_model_untouched():
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"vit\.layers\.0\.attention\.q_proj.*in_features=32, out_features=32.*7"):
        get_peft_model(model, ConsolidatorConfig(fc_groups=[7]))
    assert not any("consolidator" in name for name, _ in model.named_modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "kwargs,match",
    [({"fc_groups": [0]}, "fc_groups"), ({"fc_groups": []}, "fc_groups"), ({"rep_drop": 1.0}, "rep_drop"),
     ({"init_range": -1}, "init_range"), ({"qkv_grouping": "merged"}, "qkv_grouping"),
     ({"save_mode": "dense"}, "save_mode"), ({"storage_dtype": "int8"}, "storage_dtype"),
     ({"fc_groups": [8, 4], "channel_shuffle": [True]}, "channel_shuffle")],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConsolidatorConfig(**kwargs)


def test_unknown_model_type_without_targets_is_rejected():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)

        def forward(self, x):
            return self.proj(x)

    with pytest.raises(ValueError, match="no default target_modules"):
        get_peft_model(Tiny(), ConsolidatorConfig())
    model = get_peft_model(Tiny(), ConsolidatorConfig(target_modules=["proj"], fc_groups=[4]))
    assert model(torch.randn(2, 8)).shape == (2, 8)


def test_non_linear_target_is_rejected():
    with pytest.raises(TypeError, match="nn.Linear layers only"):
        get_peft_model(tiny_vit(), ConsolidatorConfig(target_modules=["layernorm_before"], fc_groups=[4]))


def test_merging_two_adapters_with_layernorm_copies_is_refused():
    model = get_peft_model(tiny_vit(), ConsolidatorConfig(fc_groups=[16]))
    model.add_adapter("other", ConsolidatorConfig(fc_groups=[8]))
    model.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="LayerNorm copies"):
        model.merge_and_unload()


def test_safe_merge_refuses_non_finite_delta():
    model = get_peft_model(tiny_vit(), ConsolidatorConfig(fc_groups=[16]))
    fc1 = model.base_model.model.vit.layers[0].mlp.fc1
    before = fc1.base_layer.weight.clone()
    with torch.no_grad():
        fc1.consolidator_branches["default"][0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaNs or infs"):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(fc1.base_layer.weight, before)


@pytest.mark.parametrize(
    "consolidated,match",
    [(True, r"layer 'vit\.layers\.0\.attention\.[qkv]_proj' needs consolidator_delta of shape \(128,\), the file "
      r"holds shape \(64,\)"),
     (False, r"layer 'vit\.layers\.0\.attention\.[qkv]_proj' needs consolidator_branches\.0\.weight of shape "
      r"\(32, 4\), the file holds shape \(32, 2\)")],
    ids=["consolidated", "branches"],
)
def test_config_that_disagrees_with_the_file_is_refused_and_model_untouched(consolidated, match, tmp_path):
    import json

    model = get_peft_model(tiny_vit(), ConsolidatorConfig(fc_groups=[16]))
    if consolidated:
        model.consolidate()
    model.save_pretrained(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["fc_groups"] = [8]  # a pattern with twice the values per row
    config_file.write_text(json.dumps(config))
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        PeftModel.from_pretrained(model, tmp_path)
    assert not any("consolidator" in name or "modules_to_save" in name for name, _ in model.named_modules())
    assert set(model.state_dict()) == set(before)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_pickled_adapter_file_is_refused(tmp_path):
    model = get_peft_model(tiny_vit(), ConsolidatorConfig(fc_groups=[16]))
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert not (tmp_path / "adapter_model.safetensors").exists()
    with pytest.raises(ValueError, match="never unpickles"):
        PeftModel.from_pretrained(tiny_vit(), tmp_path)


def test_train_layernorm_covers_only_the_adapted_towers():
    from peft_effadapt.testing import tiny_clip

    vision_only = ConsolidatorConfig(fc_groups=[8], target_modules=r"vision_model\..*(q_proj|k_proj|v_proj|out_proj|fc1|fc2)")
    model = get_peft_model(tiny_clip(), vision_only)
    saved = set(model.peft_config["default"].modules_to_save)
    assert "vision_model.post_layernorm" in saved and "vision_model.encoder.layers.0.layer_norm1" in saved
    assert not any(name.startswith("text_model") for name in saved)
    both = get_peft_model(tiny_clip(), ConsolidatorConfig(fc_groups=[8]))
    assert "text_model.final_layer_norm" in both.peft_config["default"].modules_to_save
