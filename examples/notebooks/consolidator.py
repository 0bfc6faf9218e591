# %% [markdown]
# # Consolidator: grouped-connection adapters, consolidated for storage and merged for inference
#
# Consolidator adds a grouped (block-diagonal) linear branch next to every adapted Linear layer of a ViT. During
# training the branches are separate (and checkpoints store them as they are); `model.consolidate()` sums them into one
# sparse delta per layer, whose values alone `save_pretrained` then stores (stage 1), and `merge_and_unload` folds them
# into the frozen weights (stage 2), so the deployed model is a plain ViT with the base model's speed. This notebook runs on the bundled tiny ViT and a generated image set (no Hub access).

# %%
import tempfile
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForImageClassification, Trainer, TrainingArguments, set_seed

import peft_effadapt  # noqa: F401  (registers Consolidator (and the other methods) with peft)
from peft_effadapt import ConsolidatorConfig
from peft_effadapt.testing import checkpoint_path, make_classification_dataset
from peft_effadapt.testing.processing import ShapesImageProcessor

torch.set_num_threads(1)
train = make_classification_dataset("drawings", "train", n_per_class=64)
test = make_classification_dataset("drawings", "test")
labels = train.features["label"].names
processor = ShapesImageProcessor.from_pretrained(checkpoint_path("tiny_vit"))


def transform(batch):
    return {"pixel_values": processor.to_pixel_values(np.asarray(batch["image"], dtype=np.uint8)),
            "labels": torch.as_tensor(batch["label"])}


def load_base():  # with a real model: AutoModelForImageClassification.from_pretrained("google/vit-base-...")
    return AutoModelForImageClassification.from_pretrained(checkpoint_path("tiny_vit"), num_labels=len(labels),
                                                           id2label=dict(enumerate(labels)),
                                                           ignore_mismatched_sizes=True)


# %% [markdown]
# ## Wrap the ViT: branches on q, k, v, the attention output and both MLP layers; the new head is trained as well

# %%
set_seed(0)
model = get_peft_model(load_base(), ConsolidatorConfig(fc_groups=[16, 8], channel_shuffle=[False, True],
                                                       modules_to_save=["classifier"]))
model.print_trainable_parameters()

# %%
out_dir = Path(tempfile.mkdtemp())
args = TrainingArguments(output_dir=str(out_dir), num_train_epochs=4, per_device_train_batch_size=32,
                         learning_rate=5e-3, lr_scheduler_type="cosine", warmup_steps=0.1, report_to=[],
                         save_strategy="no", logging_steps=20, remove_unused_columns=False, seed=0, disable_tqdm=True)


def accuracy(prediction):
    return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}


trainer = Trainer(model=model, args=args, train_dataset=train.with_transform(transform),
                  eval_dataset=test.with_transform(transform), compute_metrics=accuracy)
before = trainer.evaluate()["eval_accuracy"]
trainer.train()
after = trainer.evaluate()["eval_accuracy"]
print(f"accuracy on drawings: base tiny ViT {before:.3f} -> Consolidator {after:.3f}")

# %% [markdown]
# ## Stage 1: consolidate, and the adapter file holds the consolidated values only

# %%
model.consolidate()
model.save_pretrained(out_dir / "adapter")
size = (out_dir / "adapter" / "adapter_model.safetensors").stat().st_size
print(f"adapter file: {size / 1024:.1f} KiB")

# %% [markdown]
# ## Stage 2: reload on a fresh base model and merge: a plain ViT with the adapted accuracy

# %%
reloaded = PeftModel.from_pretrained(load_base(), out_dir / "adapter")
merged = reloaded.merge_and_unload()
print(type(merged).__name__, "with", sum(p.numel() for p in merged.parameters()), "parameters")
merged_accuracy = Trainer(model=merged, args=args, eval_dataset=test.with_transform(transform),
                          compute_metrics=accuracy).evaluate()["eval_accuracy"]
print(f"merged accuracy {merged_accuracy:.3f} (adapter {after:.3f})")
assert abs(merged_accuracy - after) < 1e-9
