# %% [markdown]
# # PYRA: token merging that keeps accuracy, with LoRA that merges away
#
# ToMe merges similar tokens inside a ViT, which makes it faster but loses information when applied to an adapted
# model. PYRA learns a cheap modulation (parallel yielding adaptive weights) that re-activates the tokens about to be
# merged, trained together with LoRA on q/k/v. For deployment LoRA is folded into the weights; the merging and the
# small PYRA modulation stay. This notebook runs on the bundled tiny ViT and a generated image set (no Hub access).

# %%
import tempfile

import numpy as np
import torch
from peft import PeftModel, get_peft_model
from torch.utils.flop_counter import FlopCounterMode
from transformers import Trainer, TrainingArguments, set_seed

import peft_effadapt  # noqa: F401  (registers PYRA and ToMe with peft)
from peft_effadapt import PYRAConfig, ToMeConfig, pyra_param_groups
from peft_effadapt.testing import load_tiny_vit, make_classification_dataset
from peft_effadapt.testing.processing import ShapesImageProcessor, dataset_images

torch.set_num_threads(1)
processor = ShapesImageProcessor()


def tensors(split, n_per_class=None):
    data = make_classification_dataset("shapes", split, n_per_class=n_per_class)
    return processor.to_pixel_values(dataset_images(data)), torch.as_tensor(np.asarray(data["label"]))


x_train, y_train = tensors("train", n_per_class=64)
x_test, y_test = tensors("test")


def accuracy(model):
    model.eval()
    with torch.no_grad():
        return (model(pixel_values=x_test).logits.argmax(-1) == y_test).float().mean().item()


def mflops(model):
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(pixel_values=x_test[:1])
    return counter.get_total_flops() / 1e6


# %% [markdown]
# ## Off-the-shelf ToMe on the base model (weight-free PEFT type)

# %%
vit, _ = load_tiny_vit()
vit.set_attn_implementation("eager")  # so that FlopCounterMode sees the attention matmuls
base_accuracy, base_mflops = accuracy(vit), mflops(vit)
tome = get_peft_model(vit, ToMeConfig(merge_schedule=2))
print("tokens entering each layer:", tome.base_model.planned_token_counts())
print(f"base ViT: {base_accuracy:.3f} at {base_mflops:.1f} MFLOPs; ToMe: {accuracy(tome):.3f} at {mflops(tome):.1f}")

# %% [markdown]
# ## PYRA: LoRA (rank 8) on q/k/v + merging + re-activation, trained with `Trainer` and the official param groups

# %%
set_seed(0)
vit, _ = load_tiny_vit()
vit.set_attn_implementation("eager")
model = get_peft_model(vit, PYRAConfig(merge_schedule=2, lora_r=8, modules_to_save=["classifier"]))
model.print_trainable_parameters()
print(f"at initialisation PYRA = LoRA + ToMe: {accuracy(model):.3f}")


class PixelData(torch.utils.data.Dataset):
    def __len__(self):
        return len(y_train)

    def __getitem__(self, i):
        return {"pixel_values": x_train[i], "labels": y_train[i]}


out_dir = tempfile.mkdtemp()
args = TrainingArguments(output_dir=out_dir, num_train_epochs=3, per_device_train_batch_size=32, report_to=[],
                         save_strategy="no", logging_steps=20, seed=0, disable_tqdm=True)
optimizer = torch.optim.AdamW(pyra_param_groups(model, lr=1e-3, weight_decay=1e-4))
Trainer(model=model, args=args, train_dataset=PixelData(), optimizers=(optimizer, None)).train()
adapted = accuracy(model)
print(f"after training: {adapted:.3f}")

# %% [markdown]
# ## Save, reload, deploy: LoRA folded into q/k/v, merging and the PYRA modulation kept

# %%
model.save_pretrained(f"{out_dir}/pyra")
fresh, _ = load_tiny_vit()
fresh.set_attn_implementation("eager")
deployed = PeftModel.from_pretrained(fresh, f"{out_dir}/pyra").merge_and_unload()
print(f"deployed: {accuracy(deployed):.3f} at {mflops(deployed):.1f} MFLOPs (base ViT {base_mflops:.1f})")
assert abs(accuracy(deployed) - adapted) < 1e-6
