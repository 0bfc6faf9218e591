# %% [markdown]
# # TempMe: temporal token merging for text-video retrieval on CLIP
#
# CLIP-based video retrieval encodes every sampled frame on its own (12 frames x 50 tokens for ViT-B/32), although
# neighbouring frames are nearly identical. TempMe (ICLR 2025) merges tokens progressively: inside each frame in the
# early blocks (ImgMe), then across neighbouring frames and clips (ClipMe: 12 -> 6 -> 3 -> 1 clips), so one short
# sequence per video remains that still holds a class token for every frame. LoRA (one A shared by q, k, v) and tiny
# clip position embeddings are trained. This notebook runs on the bundled tiny CLIP and generated videos (no Hub).

# %%
import copy
import time

import torch
from peft import get_peft_model
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPConfig, CLIPModel, CLIPVisionModel

import peft_effadapt  # noqa: F401  (registers TempMe with peft)
from peft_effadapt import CLIPVideoRetrieval, TempMeConfig
from peft_effadapt.tasks import encode_video_dataset
from peft_effadapt.testing import load_tiny_clip, make_video_dataset
from peft_effadapt.tuners.tempme import plan_table

torch.set_num_threads(1)
start = time.perf_counter()
clip, processor = load_tiny_clip()
train = encode_video_dataset(make_video_dataset(128, seed=0), processor)
test = encode_video_dataset(make_video_dataset(64, seed=1), processor)
print("videos:", tuple(test["pixel_values"].shape), "(videos, frames, channels, height, width)")

# %% [markdown]
# ## The schedule at ViT-B/32 shape: 600 -> 97 tokens per video, 507,648 trainable parameters
# Built on the meta device (no weights are allocated): the official schedule, the parameter count of the official
# LoRA and the multiply-accumulates of encoding one 12-frame video.

# %%
b32 = CLIPConfig(
    text_config=dict(hidden_size=512, num_hidden_layers=12, num_attention_heads=8, intermediate_size=2048),
    vision_config=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                       image_size=224, patch_size=32, attn_implementation="eager"),
    projection_dim=512,
)
with torch.device("meta"):
    b32_tempme = get_peft_model(CLIPModel(b32), TempMeConfig())
    print("trainable parameters:", b32_tempme.get_nb_trainable_parameters()[0])
    for row in plan_table(b32_tempme.base_model.tempme_plan()):
        layer, kind, n_in, r_c, r_i, n_out, cls, sequences = row
        print(f"layer {layer:2d} {kind:6s} tokens {n_in:3d} -> r_c {r_c:2d}, r_i {r_i:2d} -> {n_out:3d}; "
              f"CLS {cls:2d}; sequences/video {sequences:2d}")


def gmacs(model, pixels):
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(pixel_values=pixels)
    return counter.get_total_flops() / 2 / 1e9


with torch.device("meta"):
    frames = torch.empty(12, 3, 224, 224)
    base_macs = gmacs(CLIPVisionModel(b32.vision_config), frames)
    tempme_macs = gmacs(get_peft_model(CLIPVisionModel(b32.vision_config), TempMeConfig(lora_r=0)), frames)
print(f"GMACs per 12-frame video: meanP {base_macs:.2f}, TempMe {tempme_macs:.2f} (paper: 53.0 / 34.8 GFLOPs)")

# %% [markdown]
# ## Zero-shot meanP on the testbed, then TempMe + LoRA trained with the symmetric InfoNCE
# `CLIPVideoRetrieval` is CLIP4Clip's meanP: per-frame features, normalised and averaged. With TempMe the same
# wrapper averages the class tokens TempMe keeps per frame. The testbed preset (3 vision layers) merges 780 -> 273
# tokens per video.

# %%
meanp = CLIPVideoRetrieval(clip).evaluate(**test)
model = get_peft_model(copy.deepcopy(clip), TempMeConfig.from_preset("testbed"))
model.print_trainable_parameters()
retrieval = CLIPVideoRetrieval(model)
untrained = retrieval.evaluate(**test)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.2)
generator = torch.Generator().manual_seed(0)
retrieval.train()
for _step in range(30):
    idx = torch.randperm(len(train["input_ids"]), generator=generator)[:16]
    loss = retrieval(train["pixel_values"][idx], train["input_ids"][idx], train["attention_mask"][idx]).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
trained = retrieval.evaluate(**test)
print("tokens per sequence through the vision layers in the last forward:", model.base_model.token_counts())
for name, m in (("zero-shot meanP", meanp), ("TempMe untrained", untrained), ("TempMe trained", trained)):
    print(f"{name:17s} t2v R@1 {m['t2v_R@1']:5.1f} R@5 {m['t2v_R@5']:5.1f} R@10 {m['t2v_R@10']:5.1f} "
          f"MdR {m['t2v_MdR']:3.1f} R-Sum {m['t2v_R-Sum']:5.1f} | v2t R-Sum {m['v2t_R-Sum']:5.1f}")

# %% [markdown]
# ## Deploying: fold LoRA into q/k/v; the merging schedule stays (it is the speed-up)

# %%
deployed = model.merge_and_unload()
with torch.no_grad():
    video = CLIPVideoRetrieval(deployed).video_features(test["pixel_values"][:4])
print("deployed class:", type(deployed).__name__, "| video embeddings:", tuple(video.shape))
print(f"notebook ran in {time.perf_counter() - start:.0f} s")
