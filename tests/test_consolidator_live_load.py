"""A consolidated Consolidator file (the default save_mode) loads into live, trainable branches by every peft route:
PeftModel.from_pretrained(is_trainable=True), PeftModel.load_adapter (new or live adapter), set_peft_model_state_dict
and Trainer(resume_from_checkpoint=...). The split of the stored ΔW values is exact: recomposing them gives the stored
values back."""

from __future__ import annotations

import pytest
import torch
from peft import (
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

from peft_effadapt import ConsolidatorConfig
from peft_effadapt.testing import tiny_pixel_values, tiny_vit
from peft_effadapt.tuners.consolidator import ConsolidatorLayer

CONFIGS = {
    "default": dict(),
    "overlapping-branches-droppath": dict(fc_groups=[8, 4], channel_shuffle=[True, False], rep_drop=0.3),
}
parametrize = pytest.mark.parametrize("kwargs", list(CONFIGS.values()), ids=list(CONFIGS))


def logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(pixel_values=x).logits


def assert_same_logits(actual, expected):
    actual, expected = actual.detach(), expected.detach()
    # fp32 sums of a few hundred terms of size ~|logits|: rtol 1e-5 with atol scaled to the output's magnitude.
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def trained(kwargs, steps=2):
    model = get_peft_model(tiny_vit(seed=0), ConsolidatorConfig(modules_to_save=["classifier"], **kwargs))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        model(pixel_values=tiny_pixel_values(batch=4), labels=torch.tensor([0, 1, 2, 3])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def assert_recomposes_exactly(model, stored, adapter_name):
    """Every layer's branches recompose the stored ΔW values and Δb (fp32, a split into 1/k shares: rtol 1e-6)."""
    checked = 0
    for name, layer in model.named_modules():
        if isinstance(layer, ConsolidatorLayer) and adapter_name in layer.consolidator_patterns:
            assert adapter_name in layer.consolidator_branches and adapter_name not in layer.consolidator_delta
            values, bias = layer.consolidated_values(adapter_name)
            key = name.removeprefix("base_model.model.")
            key = key if f"{key}.consolidator_delta" in stored else "base_model.model." + key
            torch.testing.assert_close(values, stored[f"{key}.consolidator_delta"], rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(bias, stored[f"{key}.consolidator_bias"], rtol=1e-6, atol=1e-9)
            checked += 1
    assert checked == 12


def trainable_and_grads_flow(model, adapter_name):
    params = [p for n, p in model.named_parameters() if f"consolidator_branches.{adapter_name}." in n]
    assert params and all(p.requires_grad for p in params)
    model.eval()  # no DropPath: every branch must receive a gradient
    model(pixel_values=tiny_pixel_values(batch=2), labels=torch.tensor([0, 1])).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


@parametrize
def test_from_pretrained_is_trainable_gives_live_branches(kwargs, tmp_path):
    model = trained(kwargs)
    x = tiny_pixel_values()
    expected = logits(model, x)
    model.save_pretrained(tmp_path)
    stored = load_file(tmp_path / "adapter_model.safetensors")
    assert any(k.endswith("consolidator_delta") for k in stored)
    reloaded = PeftModel.from_pretrained(tiny_vit(seed=0), tmp_path, is_trainable=True)
    assert_recomposes_exactly(reloaded, stored, "default")
    assert_same_logits(logits(reloaded, x), expected)
    trainable_and_grads_flow(reloaded, "default")


def test_default_config_reloads_the_very_same_parameters(tmp_path):
    """One branch without DropPath: the stored values identify the adapter, so the split is the original."""
    model = trained({})
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_vit(seed=0), tmp_path, is_trainable=True)
    before, after = model.state_dict(), reloaded.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=1e-6, atol=0, msg=key)


@parametrize
def test_load_adapter_into_a_new_and_into_the_live_adapter(kwargs, tmp_path):
    source = trained(kwargs)
    x = tiny_pixel_values()
    expected = logits(source, x)
    source.save_pretrained(tmp_path)
    stored = load_file(tmp_path / "adapter_model.safetensors")
    target = trained(kwargs, steps=1)  # a live, differently trained adapter "default"
    assert not torch.allclose(logits(target, x), expected, atol=1e-4)
    target.load_adapter(tmp_path, adapter_name="other", is_trainable=True)
    target.set_adapter("other")
    assert_recomposes_exactly(target, stored, "other")
    assert_same_logits(logits(target, x), expected)
    trainable_and_grads_flow(target, "other")
    target.set_adapter("default")
    target.load_adapter(tmp_path, adapter_name="default", is_trainable=True)  # what Trainer's resume does
    assert_recomposes_exactly(target, stored, "default")
    assert_same_logits(logits(target, x), expected)
    trainable_and_grads_flow(target, "default")


@parametrize
def test_set_peft_model_state_dict_on_injected_model(kwargs):
    config = ConsolidatorConfig(init_weights=False, **kwargs)
    torch.manual_seed(0)
    model = inject_adapter_in_model(config, tiny_vit(seed=0))
    x = tiny_pixel_values()
    expected = logits(model, x)
    state_dict = get_peft_model_state_dict(model)
    assert any(k.endswith("consolidator_delta") for k in state_dict)
    torch.manual_seed(54321)
    fresh = inject_adapter_in_model(ConsolidatorConfig(init_weights=False, **kwargs), tiny_vit(seed=0))
    result = set_peft_model_state_dict(fresh, state_dict)
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "consolidator_" in k]
    assert_same_logits(logits(fresh, x), expected)


class _Images(torch.utils.data.Dataset):
    def __init__(self):
        torch.manual_seed(7)
        self.x, self.y = tiny_pixel_values(batch=16), torch.arange(16) % 5

    def __len__(self):
        return 16

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def test_trainer_resume_from_consolidated_checkpoint_continues(tmp_path):
    """Default config (consolidated checkpoints): resuming from step 2 reaches the adapter of the uninterrupted 4-step
    run, since the split reloads the very parameters the optimizer state belongs to."""

    def run(out, resume=None, max_steps=4):
        torch.manual_seed(0)
        model = get_peft_model(tiny_vit(seed=0), ConsolidatorConfig(modules_to_save=["classifier"]))
        args = TrainingArguments(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4,
                                 learning_rate=1e-2, lr_scheduler_type="constant", save_strategy="steps", save_steps=2, report_to=[], use_cpu=True,
                                 seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True, logging_steps=100)
        Trainer(model=model, args=args, train_dataset=_Images()).train(resume_from_checkpoint=resume)
        return model

    reference = run(tmp_path / "ref")
    assert "consolidator_delta" in str(load_file(tmp_path / "ref" / "checkpoint-2" / "adapter_model.safetensors").keys())
    run(tmp_path / "part", max_steps=2)  # constant lr: its checkpoint-2 is the 4-step run's step 2
    resumed = run(tmp_path / "part", resume=str(tmp_path / "part" / "checkpoint-2"))
    before = get_peft_model_state_dict(reference)
    after = get_peft_model_state_dict(resumed)
    assert before.keys() == after.keys()
    for key in before:  # AdamW on identical parameters and moments: equal up to fp32 rounding of the reload
        torch.testing.assert_close(after[key], before[key], rtol=1e-5, atol=1e-7, msg=key)
