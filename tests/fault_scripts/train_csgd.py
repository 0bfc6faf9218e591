"""Trainer + CentripetalSGDCallback on the tiny HF ResNet of tests/test_csgd.py: argv = output_dir
mode(fresh|victim|resume).

12 SGD steps (batch 8 of 64 generated images: 8 steps per epoch, so the run crosses an epoch), a checkpoint every 4
steps; the model is trimmed at train end and written with its slimming plan to `<output_dir>/final`. The trim's
equivalence check is off: 12 steps do not converge the clusters, and the fault test compares the two runs' trimmed
models with each other, not with the wide one. Markers: `progress.py`.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from progress import Progress
from transformers import ResNetConfig, ResNetForImageClassification, Trainer, TrainingArguments

from peft_effadapt.pruning.csgd import CentripetalSGDCallback

torch.set_num_threads(1)
out, mode = Path(sys.argv[1]), sys.argv[2]

rng = np.random.default_rng(0)
labels = rng.integers(0, 5, 64)
pixels = rng.normal(0, 1, (64, 3, 16, 16)).astype(np.float32)
pixels[np.arange(64), labels % 3] += 1.0
data = Dataset.from_dict({"pixel_values": pixels, "labels": labels}).with_format("torch")

torch.manual_seed(0)
model = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[16, 32], depths=[2, 1],
                                                  layer_type="bottleneck", num_labels=5))
callback = CentripetalSGDCallback(keep_ratio=0.5, centripetal_strength=0.3, check_equivalence=False,
                                  save_dir=str(out / "final"))
args = TrainingArguments(output_dir=str(out), max_steps=12, per_device_train_batch_size=8, learning_rate=0.05,
                         optim="sgd", optim_args="momentum=0.9,nesterov=True", max_grad_norm=0, weight_decay=1e-4,
                         lr_scheduler_type="linear", save_strategy="steps", save_steps=4, logging_steps=2,
                         restore_callback_states_from_checkpoint=True, report_to=[], use_cpu=True, seed=0,
                         data_seed=0, dataloader_num_workers=0, disable_tqdm=True)
trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback, Progress(out, mode)])
trainer.train(resume_from_checkpoint=True if mode == "resume" else None)
# the Trainer replaces a restored callback by a new instance: read the one it actually ran
ran = next(c for c in trainer.callback_handler.callbacks if isinstance(c, CentripetalSGDCallback))
(out / "callback.json").write_text(json.dumps({"clusters": ran.plan and [gp.clusters for gp in ran.plan.groups],
                                               "deviation_history": ran.deviation_history}))
