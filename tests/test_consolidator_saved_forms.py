"""Consolidator's two saved forms (docs/consolidator.md, "Saved forms"). `save_pretrained` writes the adapter as it
is: the branches while training, the consolidated delta after `consolidate()`. Either file loads back to the very
same parameters by every peft route, and a Trainer run resumed from a checkpoint continues bit for bit.

Why bitwise (torch.equal) is a fair demand here: saving and loading copy fp32 tensors through safetensors without
any arithmetic, and the resumed Trainer run repeats, in the same process, with the same seeds and single-threaded
deterministic CPU kernels, the very operations of the uninterrupted run on the restored parameters, optimizer
moments, scheduler and RNG state. Any difference means something was not restored; a tolerance would hide exactly the
defect these tests guard against (a checkpoint that reloads as another split of the same delta differs from the
trained parameters only by rounding)."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from peft import (
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainingArguments

from peft_effadapt import ConsolidatorConfig
from peft_effadapt.testing import tiny_pixel_values, tiny_vit
from peft_effadapt.tuners.consolidator import ConsolidatorLayer

from fp32 import assert_fp32_close

CONFIGS = {
    "default": dict(),
    "two-branches": dict(fc_groups=[2, 1]),
    "two-branches-shuffle-droppath": dict(fc_groups=[8, 4], channel_shuffle=[True, False], rep_drop=0.3),
}
parametrize = pytest.mark.parametrize("kwargs", list(CONFIGS.values()), ids=list(CONFIGS))
SAFETENSORS = "adapter_model.safetensors"


def logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(pixel_values=x).logits


def trained(kwargs, steps=2):
    """An adapter after `steps` AdamW steps in train mode (DropPath active where configured)."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_vit(seed=0), ConsolidatorConfig(modules_to_save=["classifier"], **kwargs))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        model(pixel_values=tiny_pixel_values(batch=4), labels=torch.tensor([0, 1, 2, 3])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def assert_same_tensors(actual: dict, expected: dict):
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


def layers(model, adapter_name="default"):
    return [m for m in model.modules() if isinstance(m, ConsolidatorLayer) and adapter_name in m.consolidator_patterns]


# -- the branch form: what save_pretrained writes while training ------------------------------------------------------
@parametrize
def test_save_pretrained_reloads_the_very_same_parameters(kwargs, tmp_path):
    model = trained(kwargs)
    model.save_pretrained(tmp_path)
    stored = load_file(tmp_path / SAFETENSORS)
    assert any(".consolidator_branches." in k for k in stored) and not any("consolidator_delta" in k for k in stored)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["consolidated"] is False
    reloaded = PeftModel.from_pretrained(tiny_vit(seed=0), tmp_path, is_trainable=True)
    assert_same_tensors(reloaded.state_dict(), model.state_dict())
    assert reloaded.get_nb_trainable_parameters() == model.get_nb_trainable_parameters()

    other = trained(kwargs, steps=1)  # load_adapter into a new adapter of another model
    other.load_adapter(tmp_path, adapter_name="other", is_trainable=True)
    assert_same_tensors(get_peft_model_state_dict(other, adapter_name="other"), get_peft_model_state_dict(model))

    torch.manual_seed(1)  # direct injection with another random init, then set_peft_model_state_dict
    injected = inject_adapter_in_model(ConsolidatorConfig(modules_to_save=["classifier"], **kwargs), tiny_vit(seed=0))
    state = {k.removeprefix("base_model.model."): v for k, v in get_peft_model_state_dict(model).items()}
    result = set_peft_model_state_dict(injected, state)
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "consolidator_" in k]
    assert_same_tensors(get_peft_model_state_dict(injected), state)


# -- the consolidated form: what a user ships ----------------------------------------------------------------------
@parametrize
def test_consolidate_writes_the_compact_form_and_reloads_it_exactly(kwargs, tmp_path):
    model = trained(kwargs)
    x = tiny_pixel_values()
    branch_logits = logits(model, x)
    model.save_pretrained(tmp_path / "branches")
    model.consolidate()
    assert_fp32_close(logits(model, x), branch_logits)  # ΔW summed from the branches: another operation order
    model.save_pretrained(tmp_path / "consolidated")
    stored = load_file(tmp_path / "consolidated" / SAFETENSORS)
    assert not any(".consolidator_branches." in k for k in stored)
    for layer in layers(model):
        assert not layer.holds_branches("default")
    delta_sizes = sorted(v.numel() for k, v in stored.items() if k.endswith("consolidator_delta"))
    assert delta_sizes == sorted(layer.consolidator_support["default"].numel() for layer in layers(model))
    saved = json.loads((tmp_path / "consolidated" / "adapter_config.json").read_text())
    assert saved["consolidated"] is True
    branch_size = (tmp_path / "branches" / SAFETENSORS).stat().st_size
    assert (tmp_path / "consolidated" / SAFETENSORS).stat().st_size < branch_size  # one Δb; ΔW on the union

    for trainable in (False, True):
        reloaded = PeftModel.from_pretrained(tiny_vit(seed=0), tmp_path / "consolidated", is_trainable=trainable)
        assert_same_tensors(reloaded.state_dict(), model.state_dict())
        assert torch.equal(logits(reloaded, x), logits(model, x))
        assert reloaded.get_nb_trainable_parameters()[0] == (model.get_nb_trainable_parameters()[0] if trainable else 0)
    assert_fp32_close(logits(reloaded.merge_and_unload(), x), branch_logits)


@pytest.mark.parametrize("storage_dtype", ["float16", "bfloat16"])
def test_consolidate_rounds_to_the_storage_dtype(storage_dtype, tmp_path):
    """Low-precision storage: the consolidated model computes what its file holds, so the reload is exact."""
    dtype = getattr(torch, storage_dtype)
    model = get_peft_model(tiny_vit(seed=0), ConsolidatorConfig(fc_groups=[8, 4], storage_dtype=storage_dtype,
                                                                init_weights=False))
    x = tiny_pixel_values()
    branch_logits = logits(model, x)
    model.consolidate()
    delta = layers(model)[0].consolidator_delta["default"]
    assert delta.dtype == torch.float32 and torch.equal(delta, delta.to(dtype).float())
    consolidated_logits = logits(model, x)
    assert 0 < (consolidated_logits - branch_logits).abs().max() < 5e-2  # really rounded, still close
    model.save_pretrained(tmp_path)
    assert {v.dtype for k, v in load_file(tmp_path / SAFETENSORS).items() if "consolidator_" in k} == {dtype}
    reloaded = PeftModel.from_pretrained(tiny_vit(seed=0), tmp_path)
    assert torch.equal(logits(reloaded, x), consolidated_logits)


def test_consolidate_names_unknown_adapters_and_changes_nothing():
    model = get_peft_model(tiny_vit(seed=0), ConsolidatorConfig(fc_groups=[8]))
    with pytest.raises(ValueError, match=r"Cannot consolidate adapters \['other'\]: the model holds \['default'\]"):
        model.consolidate(["default", "other"])
    assert all(layer.holds_branches("default") for layer in layers(model))
    assert model.peft_config["default"].consolidated is False


def test_consolidate_refuses_a_name_that_is_not_a_string():
    model = get_peft_model(tiny_vit(seed=0), ConsolidatorConfig(fc_groups=[8]))
    for bad in (3, ["default", 3]):
        with pytest.raises(TypeError, match=r"consolidate\(\) takes an adapter name or a list of names, got"):
            model.consolidate(bad)
    assert all(layer.holds_branches("default") for layer in layers(model))
    assert model.peft_config["default"].consolidated is False


def test_consolidate_twice_changes_nothing():
    model = get_peft_model(tiny_vit(seed=0), ConsolidatorConfig(fc_groups=[8, 4], init_weights=False))
    model.consolidate()
    once = {key: value.clone() for key, value in model.state_dict().items()}
    model.consolidate()
    assert_same_tensors(model.state_dict(), once)
    assert model.peft_config["default"].consolidated is True


def test_consolidate_one_of_two_adapters():
    model = get_peft_model(tiny_vit(seed=0), ConsolidatorConfig(fc_groups=[8], train_layernorm=False))
    model.add_adapter("other", ConsolidatorConfig(fc_groups=[4], train_layernorm=False))
    model.consolidate("other")
    assert all(layer.holds_branches("default") and not layer.holds_branches("other") for layer in layers(model))
    assert (model.peft_config["default"].consolidated, model.peft_config["other"].consolidated) == (False, True)


# -- a file sets the form of the adapter it is loaded into ---------------------------------------------------------
def test_a_loaded_file_sets_the_form_of_a_live_adapter():
    kwargs = CONFIGS["two-branches-shuffle-droppath"]
    source = trained(kwargs)
    x = tiny_pixel_values()
    branch_state = get_peft_model_state_dict(source)
    shipped = copy.deepcopy(source)
    shipped.consolidate()
    consolidated_state = get_peft_model_state_dict(shipped)

    target = trained(kwargs, steps=1)  # live branches, other values
    set_peft_model_state_dict(target, consolidated_state)
    assert not any(layer.holds_branches("default") for layer in layers(target))
    assert target.peft_config["default"].consolidated is True
    assert torch.equal(logits(target, x), logits(shipped, x))
    assert all(p.requires_grad for n, p in target.named_parameters() if "consolidator_" in n)

    set_peft_model_state_dict(target, branch_state)  # and back: a branch file restores branches
    assert all(layer.holds_branches("default") for layer in layers(target))
    assert target.peft_config["default"].consolidated is False
    assert_same_tensors(get_peft_model_state_dict(target), branch_state)
    assert torch.equal(logits(target, x), logits(source, x))


def test_a_refused_file_leaves_the_adapter_in_its_form():
    """The form switch happens before the file checks: a damaged file of the other form puts the adapter back as it
    was, its very parameters (an optimizer still holds them) and its config."""
    source = trained(CONFIGS["two-branches"])
    shipped = copy.deepcopy(source)
    shipped.consolidate()
    for state, target in ((get_peft_model_state_dict(shipped), trained(CONFIGS["two-branches"], steps=1)),
                          (get_peft_model_state_dict(source), shipped)):
        key = sorted(k for k in state if "consolidator_" in k)[-1]
        state[key] = state[key].flatten()[:-1].clone()
        params = dict(target.named_parameters())
        before = {name: param.detach().clone() for name, param in params.items()}
        consolidated = target.peft_config["default"].consolidated
        with pytest.raises(ValueError, match="has shape"):
            set_peft_model_state_dict(target, state)
        assert dict(target.named_parameters()).keys() == params.keys()
        assert all(param is params[name] for name, param in target.named_parameters())
        assert_same_tensors({name: param.detach() for name, param in target.named_parameters()}, before)
        assert target.peft_config["default"].consolidated is consolidated


# -- files written before consolidate() existed ---------------------------------------------------------------------
def test_branch_file_with_the_earlier_folded_bias_loads(tmp_path):
    """Up to the version that added `consolidate()`, save_mode="branches" without DropPath stored the branch biases
    summed into `consolidator_bias` (and no branch biases). Such a file is rebuilt here from a current one and loads
    as rep_bias=False, train_bias=True: the same layout and the same outputs."""
    model = get_peft_model(tiny_vit(seed=0), ConsolidatorConfig(fc_groups=[8, 4], save_mode="branches",
                                                                init_weights=False))
    x = tiny_pixel_values()
    expected = logits(model, x)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / SAFETENSORS)
    for key in [k for k in tensors if k.endswith("consolidator_bias")]:
        layer = key.removesuffix("consolidator_bias")
        for branch_bias in [k for k in tensors if k.startswith(layer + "consolidator_branches.") and k.endswith(".bias")]:
            tensors[key] = tensors[key] + tensors.pop(branch_bias)
    save_file(tensors, tmp_path / SAFETENSORS)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["rep_bias"] is True

    reloaded = PeftModel.from_pretrained(tiny_vit(seed=0), tmp_path)
    config = reloaded.peft_config["default"]
    assert (config.rep_bias, config.train_bias, config.consolidated) == (False, True, False)
    assert_fp32_close(logits(reloaded, x), expected)  # Σ c_b + δ summed once instead of per branch
    assert_same_tensors({k: v for k, v in get_peft_model_state_dict(reloaded).items()}, tensors)


def test_save_mode_consolidated_set_in_code_warns():
    with pytest.warns(FutureWarning, match=r"model\.consolidate\(\)"):
        ConsolidatorConfig(save_mode="consolidated")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # what earlier versions wrote with consolidated files: read silently
        ConsolidatorConfig(save_mode="consolidated", consolidated=True)


# -- Trainer checkpoints resume bit for bit ------------------------------------------------------------------------
class _Images(torch.utils.data.Dataset):
    def __init__(self):
        generator = torch.Generator().manual_seed(7)
        self.x = torch.randn(16, 3, 32, 32, generator=generator)
        self.y = torch.arange(16) % 5

    def __len__(self):
        return 16

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


class _LossRecordingTrainer(Trainer):
    """Keeps every training loss as the tensor it is (the logged loss is rounded to 4 digits)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        self.losses.append((result[0] if return_outputs else result).detach().clone())
        return result


def _train(kwargs, output_dir, resume=None):
    torch.manual_seed(0)
    model = get_peft_model(tiny_vit(seed=0), ConsolidatorConfig(modules_to_save=["classifier"], **kwargs))
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2, warmup_steps=1,
        weight_decay=0.01, save_strategy="steps", save_steps=2, report_to=[], use_cpu=True, seed=0, data_seed=0,
        dataloader_num_workers=0, disable_tqdm=True, logging_steps=100,
    )
    trainer = _LossRecordingTrainer(model=model, args=args, train_dataset=_Images())
    trainer.losses = []
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer.losses


@pytest.mark.parametrize("kwargs", [CONFIGS["two-branches"], CONFIGS["two-branches-shuffle-droppath"]],
                         ids=["two-branches", "two-branches-shuffle-droppath"])
def test_trainer_resume_continues_bit_for_bit(kwargs, tmp_path):
    """4 steps (linear schedule with warm-up, AdamW with weight decay, DropPath where configured) uninterrupted, and
    the same run resumed from its step-2 checkpoint: the same losses at steps 3 and 4 and the same final model."""
    reference, reference_losses = _train(kwargs, tmp_path / "reference")
    checkpoint = tmp_path / "reference" / "checkpoint-2"
    assert any(".consolidator_branches." in k for k in load_file(checkpoint / SAFETENSORS))
    resumed, resumed_losses = _train(kwargs, tmp_path / "resumed", resume=str(checkpoint))
    assert len(reference_losses) == 4 and len(resumed_losses) == 2
    for step, (actual, expected) in enumerate(zip(resumed_losses, reference_losses[2:]), start=3):
        assert torch.equal(actual, expected), f"loss of step {step}: {actual} vs {expected}"
    assert_same_tensors(resumed.state_dict(), reference.state_dict())
    assert not torch.equal(reference_losses[0], reference_losses[3])  # it trained
