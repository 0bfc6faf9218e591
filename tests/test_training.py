"""Consolidator under the Hugging Face training stack: Trainer, Accelerate (bf16 autocast), accelerate launch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from datasets import Dataset
from peft import PeftModel, get_peft_model
from transformers import Trainer, TrainingArguments

from peft_effadapt import ConsolidatorConfig
from peft_effadapt.testing import tiny_vit

REPO = Path(__file__).resolve().parents[1]


def brightest_channel_dataset(n: int, seed: int) -> Dataset:
    """Noise images whose label is the colour channel that was brightened: learnable by a tiny ViT in seconds."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    pixels = rng.normal(0, 1, (n, 3, 32, 32)).astype(np.float32)
    pixels[np.arange(n), labels] += 0.8
    return Dataset.from_dict({"pixel_values": pixels, "labels": labels}).with_format("torch")


def accuracy(prediction):
    logits, labels = prediction
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


def test_trainer_fits_and_saved_adapter_reproduces(tmp_path):
    model = get_peft_model(tiny_vit(num_labels=3), ConsolidatorConfig(fc_groups=[16], rep_drop=0.1,
                                                                      modules_to_save=["classifier"]))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=60, per_device_train_batch_size=32,
                             learning_rate=1e-2, report_to=[], save_strategy="no", logging_steps=20,
                             use_cpu=True, seed=0, dataloader_num_workers=0)
    train, test = brightest_channel_dataset(640, 0), brightest_channel_dataset(192, 1)
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=test, compute_metrics=accuracy)
    before = trainer.evaluate()["eval_accuracy"]
    trainer.train()
    after = trainer.evaluate()["eval_accuracy"]
    assert after > 0.8 and after > before + 0.3, (before, after)

    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(tiny_vit(num_labels=3), tmp_path / "adapter")
    merged = reloaded.merge_and_unload()
    pixels = test[:32]["pixel_values"]
    model.eval()
    with torch.no_grad():
        expected = model(pixel_values=pixels).logits
        torch.testing.assert_close(merged(pixel_values=pixels).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one global state per process (the Trainer made one already in this session)."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_accelerate_bf16_autocast_step_keeps_fp32_adapter(fresh_accelerate_state):
    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    model = get_peft_model(tiny_vit(num_labels=3), ConsolidatorConfig(fc_groups=[16], modules_to_save=["classifier"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    batch = brightest_channel_dataset(16, 0)[:]
    branch = accelerator.unwrap_model(model).base_model.model.vit.layers[0].mlp.fc1.consolidator_branches["default"][0]
    before = branch.weight.detach().clone()
    outputs = {}
    hook = branch.register_forward_hook(lambda module, inputs, output: outputs.update(dtype=output.dtype))
    with accelerator.autocast():
        loss = model(pixel_values=batch["pixel_values"], labels=batch["labels"]).loss
    hook.remove()
    accelerator.backward(loss)
    optimizer.step()
    assert torch.isfinite(loss)
    assert outputs["dtype"] == torch.bfloat16  # the branch matmul ran in bf16 under autocast
    assert branch.weight.dtype == torch.float32 and not torch.equal(branch.weight.detach(), before)


@pytest.mark.skipif(not (REPO / "peft_effadapt/testing/checkpoints/tiny_vit/model.safetensors").exists(),
                    reason="bundled tiny ViT checkpoint not built")
def test_example_runs_under_accelerate_launch_with_two_processes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no",
           str(REPO / "examples/consolidator_vit.py"), "--tiny", "--max-steps", "6", "--batch-size", "16",
           "--output-dir", str(tmp_path), "--cpu"]  # `--cpu --num_processes 2` would start ONE process; this starts two (gloo)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("training in 2 process(es)") == 2  # printed by both ranks
    assert "reloaded+merged" in result.stdout
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "merged" / "model.safetensors").exists()
