"""TempMe vs meanP on text-video retrieval: quality on the testbed videos, compute and speed at ViT-B/32 shape.

(a) Quality. The bundled tiny CLIP (`load_tiny_clip()`: 32² frames, patch 4 -> 65 tokens, 3 vision layers) is
    fine-tuned for retrieval on `make_video_dataset` (12-frame captioned videos; train seed 0, test seed 1) with the
    symmetric InfoNCE of `CLIPVideoRetrieval`, in two modes:
    * LoRA:      meanP + LoRA  = TempMeConfig without merging (official shared-A LoRA r=8 on q/k/v of both towers)
                 TempMe + LoRA = TempMeConfig.from_preset("testbed") (ImgMe r=8 in layer 0, clips 12 -> 4 -> 1)
    * full FT:   the same two, lora_r=0 and full_finetune=True (every backbone weight trained).
    Reported: R@1/5/10, MdR, R-Sum (text->video and video->text), before and after training, mean over --seeds;
    GMACs per video of the tiny vision tower as deployed (LoRA folded; FlopCounterMode, eager attention).
(b) Compute and speed at ViT-B/32 shape (random weights, 224², 12 frames per video, --threads):
    * GMACs per video (meta tensors; the paper: 53.0 -> 34.8 GFLOPs),
    * inference latency per video (vision tower, LoRA merged), ratio meanP / TempMe,
    * training step time (vision + text towers, InfoNCE, AdamW, batch --train-videos videos) in LoRA and full-FT
      mode, ratio meanP / TempMe,
    * training memory in both modes: weights + gradients + AdamW state of the trained tensors + the peak of live
      activations saved for backward (counted with torch.autograd.graph.saved_tensors_hooks, one entry per storage).
      On a GPU this sum is the step's memory peak (reached at the end of forward); CPU process RSS is not used
      because the allocator keeps freed pages and other processes share the machine. Ratio TempMe / meanP
      (the paper: 75.2 % with full fine-tuning on A100s).

    python benchmarks/tempme.py [--threads 1] [--steps 60] [--batch 16] [--seeds 0] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import numpy as np
import torch
from peft import get_peft_model
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPConfig, CLIPModel, CLIPVisionModel

from peft_effadapt import CLIPVideoRetrieval, TempMeConfig
from peft_effadapt.tasks import encode_video_dataset
from peft_effadapt.testing import load_tiny_clip, make_video_dataset

from common import RESULTS, interleaved_medians, write_result

NO_MERGING = dict(imgme_r=0, clip_merge_layers=[], clip_group_sizes=[], clip_position_embedding=False)
METHODS = {
    "meanP+LoRA": dict(preset="testbed", **NO_MERGING),
    "TempMe+LoRA": dict(preset="testbed"),
    "meanP full-FT": dict(preset="testbed", lora_r=0, full_finetune=True, **NO_MERGING),
    "TempMe full-FT": dict(preset="testbed", lora_r=0, full_finetune=True),
}
B32_METHODS = {k: dict(v, preset="vit-b/32") for k, v in METHODS.items()}
KEYS = ("t2v_R@1", "t2v_R@5", "t2v_R@10", "t2v_MdR", "t2v_R-Sum", "v2t_R@1", "v2t_R-Sum")


def make_config(spec: dict) -> TempMeConfig:
    spec = dict(spec)
    return TempMeConfig.from_preset(spec.pop("preset"), **spec)


# -- (a) quality on the testbed ---------------------------------------------------------------------------------------
def gmacs(model, pixels) -> float:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(pixel_values=pixels)
    return counter.get_total_flops() / 2 / 1e9


def train(retrieval: CLIPVideoRetrieval, data: dict, steps: int, batch: int, lr: float, seed: int) -> float:
    """The official recipe scaled down: AdamW (wd 0.2, eps 1e-6), cosine with 10 % linear warm-up, grad clip 1."""
    params = [p for p in retrieval.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.2, eps=1e-6)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + np.cos(np.pi * (s - warmup) / (steps - warmup))))
    generator = torch.Generator().manual_seed(seed)
    retrieval.train()
    start = time.perf_counter()
    for _ in range(steps):
        idx = torch.randperm(len(data["input_ids"]), generator=generator)[:batch]
        loss = retrieval(data["pixel_values"][idx], data["input_ids"][idx], data["attention_mask"][idx]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    retrieval.eval()
    return time.perf_counter() - start


def quality(args) -> dict:
    clip, processor = load_tiny_clip()
    train_data = encode_video_dataset(make_video_dataset(args.train_videos, seed=0), processor)
    test_data = encode_video_dataset(make_video_dataset(args.test_videos, seed=1), processor)
    pixels = test_data["pixel_values"][0]  # one video, (12, C, H, W)
    results = {}
    for name, spec in METHODS.items():
        runs, zero_shot = [], None
        for seed in args.seeds:
            torch.manual_seed(seed)
            model = get_peft_model(copy.deepcopy(clip), make_config(spec))
            retrieval = CLIPVideoRetrieval(model)
            if zero_shot is None:
                zero_shot = retrieval.evaluate(**test_data)
            lr = args.lr if not spec.get("full_finetune") else args.full_ft_lr
            seconds = train(retrieval, train_data, args.steps, args.batch, lr, seed)
            runs.append({**retrieval.evaluate(**test_data), "train_seconds": seconds})
            print(name, seed, {k: round(runs[-1][k], 2) for k in KEYS}, flush=True)
        vision = copy.deepcopy(clip.vision_model)
        vision.config._attn_implementation = "eager"
        deployed = get_peft_model(vision, make_config({**spec, "lora_r": 0, "full_finetune": False}))  # LoRA folded
        results[name] = {
            "zero_shot": {k: zero_shot[k] for k in KEYS},
            "trained": {k: float(np.mean([r[k] for r in runs])) for k in KEYS},
            "trained_per_seed": [{k: r[k] for k in KEYS} for r in runs],
            "trainable_params": int(sum(p.numel() for p in model.parameters() if p.requires_grad)),
            "gmacs_per_video_tiny": gmacs(deployed, pixels),
        }
    return results


# -- (b) compute and speed at ViT-B/32 shape --------------------------------------------------------------------------
def b32_config() -> CLIPConfig:
    return CLIPConfig(
        text_config=dict(hidden_size=512, num_hidden_layers=12, num_attention_heads=8, intermediate_size=2048,
                         max_position_embeddings=77),
        vision_config=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                           image_size=224, patch_size=32),
        projection_dim=512,
    )


class SavedActivations:
    """Peak bytes of live tensors saved for backward (one count per storage); weights that autograd saves for the
    input gradient are not activations and are skipped (they are counted once as weights)."""

    def __init__(self, model: torch.nn.Module):
        self.weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.live: dict[int, int] = {}
        self.refs: dict[int, int] = {}
        self.peak = 0

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self.weights:
            return (None, tensor)
        if key not in self.live:
            self.live[key] = storage.nbytes()
            self.peak = max(self.peak, sum(self.live.values()))
        self.refs[key] = self.refs.get(key, 0) + 1
        return (key, tensor)

    def unpack(self, packed):
        key, tensor = packed
        if key is None:
            return tensor
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.live.pop(key, None)
        return tensor


def speed(args) -> dict:
    cfg = b32_config()
    out = {"gmacs_per_video_b32": {}, "latency_s_per_video": {}, "train_step_s": {}, "train_memory_mb": {}}
    vision_cfg = copy.deepcopy(cfg.vision_config)
    vision_cfg._attn_implementation = "eager"
    with torch.device("meta"):
        pixels = torch.empty(12, 3, 224, 224)
        out["gmacs_per_video_b32"] = {
            "meanP": gmacs(CLIPVisionModel(vision_cfg), pixels),
            "TempMe": gmacs(get_peft_model(CLIPVisionModel(vision_cfg), TempMeConfig(lora_r=0)), pixels),
        }
    # inference latency: one 12-frame video through the vision tower (deployed: LoRA folded into q/k/v)
    torch.manual_seed(0)
    base = CLIPVisionModel(cfg.vision_config).eval()
    tempme = get_peft_model(copy.deepcopy(base), TempMeConfig()).merge_and_unload().eval()
    video = torch.randn(12, 3, 224, 224)

    def encode(model):
        with torch.no_grad():
            return lambda: model(pixel_values=video)

    times = interleaved_medians({"meanP": encode(base), "TempMe": encode(tempme)}, repeats=args.repeats, warmup=1)
    out["latency_s_per_video"] = {**times, "speedup": times["meanP"] / times["TempMe"]}
    del base, tempme
    # training step: both towers, batch of videos and captions
    torch.manual_seed(0)
    clip = CLIPModel(cfg)
    videos = torch.randn(args.train_videos_b32, 12, 3, 224, 224)
    ids = torch.randint(3, 400, (args.train_videos_b32, 20))
    for mode, names in (("LoRA", ("meanP+LoRA", "TempMe+LoRA")), ("full-FT", ("meanP full-FT", "TempMe full-FT"))):
        steps, memory = {}, {}
        for name in names:
            retrieval = CLIPVideoRetrieval(get_peft_model(copy.deepcopy(clip), make_config(B32_METHODS[name])))
            params = [p for p in retrieval.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=1e-6)

            def step(retrieval=retrieval, optimizer=optimizer):
                retrieval(videos, ids).loss.backward()
                optimizer.step()
                optimizer.zero_grad()

            step()
            recorder = SavedActivations(retrieval)
            with torch.autograd.graph.saved_tensors_hooks(recorder.pack, recorder.unpack):
                loss = retrieval(videos, ids).loss
            loss.backward()
            state = sum(p.numel() * p.element_size() for p in retrieval.parameters())
            trained = sum(p.numel() * p.element_size() for p in params) * 3  # gradient + 2 AdamW moments
            memory[name] = {"weights_mb": state / 2**20, "grad_optimizer_mb": trained / 2**20,
                            "activations_mb": recorder.peak / 2**20,
                            "total_mb": (state + trained + recorder.peak) / 2**20}
            steps[name] = step
        timed = interleaved_medians(steps, repeats=args.step_repeats, warmup=0)
        out["train_step_s"][mode] = {**timed, "speedup": timed[names[0]] / timed[names[1]]}
        out["train_memory_mb"][mode] = {**memory, "ratio": memory[names[1]]["total_mb"] / memory[names[0]]["total_mb"],
                                        "activation_ratio": memory[names[1]]["activations_mb"]
                                        / memory[names[0]]["activations_mb"]}
        print(mode, out["train_step_s"][mode], {k: v for k, v in out["train_memory_mb"][mode].items()
                                                if "ratio" in k}, flush=True)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--full-ft-lr", type=float, default=1e-4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--train-videos", type=int, default=256)
    parser.add_argument("--test-videos", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--step-repeats", type=int, default=2)
    parser.add_argument("--train-videos-b32", type=int, default=2)
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    payload = {"settings": vars(args)}
    previous = RESULTS / "tempme.json"
    if previous.exists():  # keep the last run of a part skipped now, with the command that made it
        old = json.loads(previous.read_text())
        for key, skipped in (("quality_testbed", args.skip_quality), ("b32_shape", args.skip_speed)):
            if skipped and key in old:
                payload[key] = {**old[key], "command": old[key].get("command", old.get("command"))}
    if not args.skip_quality:
        payload["quality_testbed"] = quality(args)
    if not args.skip_speed:
        payload["b32_shape"] = speed(args)
    payload["runtime_s"] = time.perf_counter() - start
    write_result("tempme", payload)


if __name__ == "__main__":
    main()
