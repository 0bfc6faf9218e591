"""Trainer + ResRepCallback on the tiny basic-block HF ResNet of tests/test_resrep.py: argv = output_dir
mode(fresh|victim|resume).

16 SGD steps (batch 16 of 160 generated images: 10 steps per epoch, so the run crosses an epoch), masks updated every
2 steps after a 2-step warm-up, a checkpoint every 6 steps (checkpoint 6 already holds masked channels); at train end
the callback converts the model, dropping the masked rows (16 steps do not decay them below the threshold, so the
plan is the masks'), and writes it with its slimming plan to `<output_dir>/slimmed`. Plain
`resume_from_checkpoint` (ResRep restores its counters from the checkpoint's trainer state itself; the masks are
model buffers). Markers: `progress.py`.
"""

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from progress import Progress
from transformers import ResNetConfig, ResNetForImageClassification, Trainer, TrainingArguments

from peft_effadapt.pruning import ResRepCallback, resrep_param_groups
from peft_effadapt.testing import randomize_batchnorm

torch.set_num_threads(1)
out, mode = Path(sys.argv[1]), sys.argv[2]

rng = np.random.default_rng(0)
labels = rng.integers(0, 5, 160)
pixels = rng.normal(0, 1, (160, 3, 16, 16)).astype(np.float32)
pixels[np.arange(160), labels % 3] += 0.8
data = Dataset.from_dict({"pixel_values": pixels, "labels": labels}).with_format("torch")

torch.manual_seed(0)
model = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[16, 32], depths=[1, 1],
                                                  layer_type="basic", num_labels=5))
randomize_batchnorm(model)  # non-trivial BatchNorms, as in tests/test_resrep.py
model.train()
callback = ResRepCallback(flops_target=0.7, lasso_strength=0.05, mask_interval=2, warmup_steps=2, begin_granularity=6,
                          drop_masked_rows=True)
callback.prepare(model, {"pixel_values": data[:8]["pixel_values"]})
optimizer = torch.optim.SGD(resrep_param_groups(model, lr=0.05, compactor_momentum=0.9), lr=0.05, momentum=0.9)
args = TrainingArguments(output_dir=str(out), max_steps=16, per_device_train_batch_size=16, learning_rate=0.05,
                         lr_scheduler_type="cosine", max_grad_norm=0, save_strategy="steps", save_steps=6,
                         logging_steps=1000, report_to=[], use_cpu=True, seed=0, data_seed=0,
                         dataloader_num_workers=0, disable_tqdm=True)
trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback, Progress(out, mode)],
                  optimizers=(optimizer, None))
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the conversion error of dropping undecayed masked rows is expected here
    trainer.train(resume_from_checkpoint=True if mode == "resume" else None)
ran = next(c for c in trainer.callback_handler.callbacks if isinstance(c, ResRepCallback))
(out / "callback.json").write_text(json.dumps({
    key: getattr(ran, key) for key in ("mask_updates", "last_update_step", "target_reached_step", "masked_flops_ratio",
                                       "final_flops_ratio", "conversion_error")}))
(out / "final").mkdir()  # the end marker the harness checks for
