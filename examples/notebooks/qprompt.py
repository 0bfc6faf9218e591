# %% [markdown]
# # QPrompt: quantised CLIP prompts, stored in a few bits
#
# QPrompt trains a CLIP prompt (here CoOp's 4-token context) *through* a very low-bit quantiser: every forward pass
# uses a K-means codebook of 2^b values fitted to the z-score-normalised context, gradients reach the fp32 latent
# through a straight-through estimator, and the codebook is refitted only now and then (constrained adaptive
# clustering). The quantisation error acts as a regulariser, and the saved adapter is tiny: b-bit packed indices
# plus a 2^b-entry fp16 codebook. This notebook runs on the testbed bundled with the library (no Hub access).

# %%
import tempfile
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model
from safetensors import safe_open
from transformers import Trainer, TrainingArguments, set_seed

import peft_effadapt  # noqa: F401  (registers QPrompt and the other methods with peft)
from peft_effadapt import CLIPZeroShotClassifier, CoOpConfig, QPromptConfig
from peft_effadapt.tasks import evaluate_base_to_novel
from peft_effadapt.testing import (
    base_novel_split,
    dataset_images,
    few_shot_split,
    load_tiny_clip,
    make_classification_dataset,
)

torch.set_num_threads(1)
clip, processor = load_tiny_clip()  # with a real model: CLIPModel / CLIPProcessor.from_pretrained(...)
tokenizer, to_pixel_values = processor.tokenizer, processor.image_processor.to_pixel_values

# %% [markdown]
# ## Data: 16 shots of the base classes for training; base and novel test classes for the CoOp protocol

# %%
train = make_classification_dataset("shapes", "train")
test = make_classification_dataset("shapes", "test")
base_train, _ = base_novel_split(few_shot_split(train, shots=16, seed=0))
base_test, novel_test = base_novel_split(test)


def scores(classifier):
    return evaluate_base_to_novel(classifier.eval(), base_test, novel_test, to_pixel_values)


print("zero-shot:", scores(CLIPZeroShotClassifier(clip, tokenizer, template="a photo of a {}.")))

# %% [markdown]
# ## 1-bit QCoOp with peft and `transformers.Trainer`
# `bits`, the refit schedule (`t_min`, `kl_threshold`) and the host (`coop`, `rlp`, `maple`) are config fields.

# %%
config = QPromptConfig(host="coop", bits=1, ctx_init="a photo of a").resolve_tokens(tokenizer)
set_seed(0)
model = get_peft_model(clip, config)
model.print_trainable_parameters()
classifier = CLIPZeroShotClassifier(model, tokenizer, base_train.features["label"].names)
data = Dataset.from_dict({"pixel_values": to_pixel_values(dataset_images(base_train)).numpy(),
                          "labels": np.asarray(base_train["label"])}).with_format("torch")
out_dir = tempfile.mkdtemp()
args = TrainingArguments(output_dir=out_dir, max_steps=100, per_device_train_batch_size=32, learning_rate=0.1,
                         optim="sgd", optim_args="momentum=0.9", lr_scheduler_type="cosine", weight_decay=5e-4,
                         report_to=[], save_strategy="no", logging_steps=50, seed=0, disable_tqdm=True)
Trainer(model=classifier, args=args, train_dataset=data).train()
trained = scores(classifier)
print("QCoOp 1 bit:", trained)
prompt = model.base_model.prompt_matrix()
print("context", tuple(prompt.shape), "holds", torch.unique(prompt).numel(), "distinct values")
print("codebook refits:", model.base_model.refit_counts())

# %% [markdown]
# ## Storage: packed indices + fp16 codebook, and an exact reload


# %%
def tensor_bytes(folder):
    with safe_open(Path(folder) / "adapter_model.safetensors", framework="pt") as handle:
        return {k.rsplit(".", 1)[-1]: handle.get_tensor(k).numel() * handle.get_tensor(k).element_size()
                for k in handle.keys()}  # noqa: SIM118


model.save_pretrained(f"{out_dir}/qcoop")
get_peft_model(load_tiny_clip()[0], CoOpConfig(ctx_init="a photo of a").resolve_tokens(tokenizer)).save_pretrained(
    f"{out_dir}/coop")
print("QCoOp tensors (bytes):", tensor_bytes(f"{out_dir}/qcoop"))
print("CoOp tensors (bytes, fp32):", tensor_bytes(f"{out_dir}/coop"))
reloaded = PeftModel.from_pretrained(load_tiny_clip()[0], f"{out_dir}/qcoop")
assert torch.equal(reloaded.base_model.prompt_matrix(), prompt)  # the deployed prompt is the evaluated one
reloaded_scores = scores(CLIPZeroShotClassifier(reloaded, tokenizer))
print("reloaded:", reloaded_scores)
assert reloaded_scores == trained
