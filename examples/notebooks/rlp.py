# %% [markdown]
# # RLP: re-parameterised low-rank prompts for CLIP
#
# RLP learns the context of CLIP's text prompt as a rank-`r` update of the embedded words of a hand-written template
# ("a photo of a"), so at initialisation the model *is* zero-shot CLIP with that template. With rank 1 the adapter
# holds 132 numbers on the bundled tiny CLIP (516 on ViT-B/16). This notebook runs on the testbed bundled with the
# library (no Hub access): a tiny CLIP and a generated image set whose classes are split into base and novel halves.

# %%
import tempfile

import numpy as np
import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model
from transformers import Trainer, TrainingArguments, set_seed

import peft_effadapt  # noqa: F401  (registers RLP (and the other methods) with peft)
from peft_effadapt import CLIPZeroShotClassifier, RLPConfig
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
print("base classes:", base_train.features["label"].names)
print("novel classes:", novel_test.features["label"].names)


def scores(classifier):
    return evaluate_base_to_novel(classifier.eval(), base_test, novel_test, to_pixel_values)


zero_shot = scores(CLIPZeroShotClassifier(clip, tokenizer, template="a photo of a {}."))
print("zero-shot:", zero_shot)

# %% [markdown]
# ## Add RLP with peft and train with `transformers.Trainer`

# %%
config = RLPConfig(ctx_init="a photo of a", rank=1, lowrank_dropout=0.1).resolve_tokens(tokenizer)
set_seed(0)  # the low-rank factor A is initialised randomly: seed it for a reproducible run
model = get_peft_model(clip, config)
model.print_trainable_parameters()
classifier = CLIPZeroShotClassifier(model, tokenizer, base_train.features["label"].names)
data = Dataset.from_dict({"pixel_values": to_pixel_values(dataset_images(base_train)).numpy(),
                          "labels": np.asarray(base_train["label"])}).with_format("torch")
out_dir = tempfile.mkdtemp()
args = TrainingArguments(output_dir=out_dir, max_steps=300, per_device_train_batch_size=32, learning_rate=0.1,
                         optim="sgd", optim_args="momentum=0.9", lr_scheduler_type="cosine", weight_decay=5e-4,
                         report_to=[], save_strategy="no", logging_steps=50, seed=0, disable_tqdm=True)
Trainer(model=classifier, args=args, train_dataset=data).train()
trained = scores(classifier)
print("RLP:", trained)

# %% [markdown]
# ## Save, reload in a new base model, and merge the prompt away for deployment

# %%
model.save_pretrained(f"{out_dir}/rlp")
base, _ = load_tiny_clip()
reloaded = PeftModel.from_pretrained(base, f"{out_dir}/rlp")
reloaded_scores = scores(CLIPZeroShotClassifier(reloaded, tokenizer))
print("reloaded:", reloaded_scores)
assert reloaded_scores == trained

# Merging folds the learned context into the text tower's position embeddings: the merged plain CLIPModel gives
# the adapter's text features for prompts in placeholder format "[BOS] X X X X {class}. [EOS]".
from peft_effadapt.prompting import placeholder_prompt_ids
from peft_effadapt.tasks.classification import projected_features

names = test.features["label"].names
prompts = placeholder_prompt_ids(names, config.n_ctx, config.placeholder_token_id, tokenizer=tokenizer,
                                 suffix=config.class_template_suffix).as_dict()
with torch.no_grad():
    adapter_features = projected_features(reloaded.get_text_features(**prompts))
    merged = reloaded.merge_and_unload()
    merged_features = projected_features(merged.get_text_features(**prompts))
print("merged vs adapter, largest text-feature difference:", (merged_features - adapter_features).abs().max().item())

# %% [markdown]
# ## The Hub card
# `peft_effadapt.hub.push_adapter_to_hub(model, "you/rlp-shapes", metrics=...)` uploads the adapter with this card.

# %%
from peft_effadapt.hub import render_model_card

card = render_model_card(f"{out_dir}/rlp", "you/rlp-shapes", metrics={"HM": trained["hm"]}, base_model="tiny-clip")
print(card.content[:600])
