# %% [markdown]
# # C-SGD: make filters identical, then fold them
#
# Centripetal SGD (Ding et al., CVPR 2019) partitions the output channels of every prunable layer into clusters
# and edits the gradient so that the members of a cluster become identical (same kernel, BN scale and shift, hence
# the same feature map). Then one channel per cluster is kept and the next layers add up the removed members'
# input slices: the slimmed network computes exactly the same function. Residual streams share one clustering.
#
# Here: the bundled tiny ResNet (trained on the generated `source` shapes) pruned to about half its FLOPs with a
# `transformers.Trainer` callback, checked, saved with its slimming plan and reloaded.

# %%
import tempfile

import numpy as np
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

import peft_effadapt  # noqa: F401
from peft_effadapt.pruning import (
    CentripetalSGDCallback,
    count_flops,
    find_channel_groups,
    load_slimmed,
    save_slimmed,
    widths_for_flops,
)
from peft_effadapt.testing import classifier_accuracy, dataset_images, load_tiny_resnet, make_domain_dataset

torch.set_num_threads(1)
model, processor = load_tiny_resnet()
train = make_domain_dataset("source", "train", n_per_class=64)
test = make_domain_dataset("source", "test")
probe = processor.to_pixel_values(dataset_images(test)[:32])
flops_before = count_flops(model, probe[:1])
acc_before = classifier_accuracy(model, test, processor)
print(f"tiny ResNet: {flops_before / 1e6:.1f} MFLOPs per image, source accuracy {acc_before:.3f}")

# %% [markdown]
# Coupled channel groups: internal convs of each bottleneck, and one residual group per stage (projection shortcut
# = the "pacesetter" that k-means clusters, plus the last conv of every block as followers). Widths for the FLOPs
# target come from one uniform keep ratio over all groups.

# %%
groups = find_channel_groups(model)
for g in groups[-3:]:
    print(g.name, "residual" if g.residual else "internal", g.size, "channels, producers:",
          [p for p, _ in g.producers])
widths = widths_for_flops(model, probe[:1], 0.5)
print("target widths:", widths)

# %% [markdown]
# Train with the callback. C-SGD needs SGD with momentum (Trainer's `optim="sgd"`); the centripetal strength is in
# the official code's lr-scaled convention (the paper used 3e-3 over 600 epochs; this 300-step run needs a strong
# pull: lr x eps = 0.03). At train end the callback compares the wide and the trimmed model's logits and slims the
# model in place; with unconverged clusters it would refuse and leave the model as it was.

# %%
train_set = Dataset.from_dict({"pixel_values": processor.to_pixel_values(dataset_images(train)).numpy(),
                               "labels": np.asarray(train["label"])}).with_format("torch")
callback = CentripetalSGDCallback(keep_ratio=widths, centripetal_strength=1.0,
                                  check_inputs={"pixel_values": probe})
args = TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=300, per_device_train_batch_size=32,
                         learning_rate=0.03, optim="sgd", optim_args="momentum=0.9,nesterov=True", max_grad_norm=0,
                         lr_scheduler_type="constant", report_to=[], save_strategy="no", logging_steps=50,
                         use_cpu=True, disable_tqdm=True, seed=0)
Trainer(model=model, args=args, train_dataset=train_set, callbacks=[callback]).train()
print("cluster deviation:", [f"{s}:{d:.1e}" for s, d in callback.deviation_history])
print(f"trim changed the logits by at most {callback.slim_report['max_abs_output_diff']:.1e}")

# %%
model.eval()
flops_after = count_flops(model, probe[:1])
acc_after = classifier_accuracy(model, test, processor)
print(f"FLOPs {flops_after / flops_before:.3f} of the original, accuracy {acc_before:.3f} -> {acc_after:.3f}")

# %% [markdown]
# The slimmed model is a stock `ResNetForImageClassification` with narrower layers; `save_slimmed` writes
# `model.safetensors`, `config.json` and `slimming_plan.json`, and `load_slimmed` rebuilds it exactly.

# %%
folder = tempfile.mkdtemp()
save_slimmed(model, None, folder)
reloaded = load_slimmed(folder)
with torch.no_grad():
    same = torch.equal(reloaded(pixel_values=probe).logits, model(pixel_values=probe).logits)
print("reloaded model gives identical logits:", same)
