# %% [markdown]
# # ResRep: prune channels without losing them, then fold
#
# ResRep (Ding et al., ICCV 2021) puts an identity 1x1 "compactor" after each internal conv + BatchNorm. Training
# keeps the ordinary gradient on the network but *resets* the task gradient of a growing set of compactor rows and
# adds a group-lasso pull on every row, so the masked rows shrink to zero while the rest of the net keeps learning.
# At the end conv, BatchNorm and compactor are merged into one narrower conv: the zero rows are removed, and the
# model is physically smaller. This notebook runs on the testbed bundled with the library (no Hub access): the tiny
# ResNet trained on generated shapes.

# %%
import tempfile
import warnings

import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

import peft_effadapt  # noqa: F401  (the library; pruning lives in peft_effadapt.pruning)
from peft_effadapt.pruning import (
    ResRepCallback,
    count_flops,
    find_channel_groups,
    load_slimmed,
    resrep_param_groups,
)
from peft_effadapt.testing import dataset_images, load_tiny_resnet, make_domain_dataset

torch.set_num_threads(1)
torch.manual_seed(0)
model, processor = load_tiny_resnet()


def to_dataset(split, n_per_class):
    data = make_domain_dataset("source", split, n_per_class=n_per_class)
    pixels = processor.to_pixel_values(dataset_images(data)).numpy()
    return Dataset.from_dict({"pixel_values": pixels, "labels": data["label"]}).with_format("torch")


def accuracy(net, data):
    net.eval()
    with torch.no_grad():
        return float((net(pixel_values=data[:]["pixel_values"]).logits.argmax(-1) == data[:]["labels"]).float().mean())


train, test = to_dataset("train", 64), to_dataset("test", 32)
print(f"unpruned accuracy: {accuracy(model, test):.3f}")

# %% [markdown]
# ## Which channels can go
#
# `find_channel_groups` lists the coupled channels: the internal convs of every bottleneck (ResRep's targets) and the
# residual streams, whose producers must all keep the same channels (C-SGD prunes those).

# %%
for group in find_channel_groups(model)[:4] + find_channel_groups(model)[-1:]:
    print(f"{group.name:22s} size {group.size:4d}  residual={group.residual}  consumers={len(group.consumers)}")

# %% [markdown]
# ## Train with compactors under the Trainer
#
# `prepare` must run before the Trainer builds its optimizer. The paper trains for 180 epochs with lambda = 1e-4 and
# compactor momentum 0.99; a 300-step demo needs a larger lasso (0.05), compactor momentum 0.9 (with 0.99 a row
# overshoots zero and oscillates) and masks frozen early, so that masked rows reach ~0 before the cosine lr ends.
# The FLOPs target is 80 % here (ResRep prunes only the bottlenecks' internal convs).

# %%
example = {"pixel_values": test[:16]["pixel_values"]}
callback = ResRepCallback(flops_target=0.8, lasso_strength=0.05, mask_interval=5, warmup_steps=10, begin_granularity=32,
                          freeze_masks_after=0.3, drop_masked_rows=True)
callback.prepare(model, example)
groups = resrep_param_groups(model, lr=0.02, compactor_momentum=0.9)
optimizer = torch.optim.SGD(groups, lr=0.02, momentum=0.9)
output_dir = tempfile.mkdtemp()
args = TrainingArguments(output_dir=output_dir, max_steps=300, per_device_train_batch_size=32, learning_rate=0.02,
                         lr_scheduler_type="cosine", max_grad_norm=0, save_strategy="no", report_to=[], use_cpu=True,
                         seed=0, disable_tqdm=True, logging_steps=100)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    Trainer(model=model, args=args, train_dataset=train, callbacks=[callback], optimizers=(optimizer, None)).train()

# %% [markdown]
# ## What the conversion did

# %%
ratio = count_flops(model, example) / callback.flops.baseline
print(f"masks reached FLOPs ratio {callback.masked_flops_ratio:.3f} at step {callback.target_reached_step}")
print(f"largest masked row at conversion: {callback.plan.metadata.get('largest_masked_row', float('nan')):.1e}")
print(f"slimmed model: {ratio:.3f} of the FLOPs, conversion max |delta| = {callback.conversion_error:.1e}")
print(f"slimmed accuracy: {accuracy(model, test):.3f}")
print({name: width for name, width in list(callback.plan.widths.items())[:4]}, "...")

# %% [markdown]
# ## Reload
#
# The slimmed model was saved to `<output_dir>/slimmed` as `config.json` + `model.safetensors` +
# `slimming_plan.json`. `from_pretrained` cannot rebuild per-layer widths; `load_slimmed` builds the stock model,
# replays the plan and loads strictly.

# %%
reloaded = load_slimmed(f"{output_dir}/slimmed")
with torch.no_grad():
    same = torch.equal(reloaded(**example).logits, model(**example).logits)
print(f"reloaded accuracy: {accuracy(reloaded, test):.3f}, identical logits: {same}")
