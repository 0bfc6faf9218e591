"""Device check: every PEFT type and both pruning callbacks trained, saved, reloaded and merged on one device and
compared with the same computation on CPU fp32; then speed ratios, eager and under torch.compile, in one run.

Correctness (per method; models at real size with random weights, see device_cases.py):
  * first training step: loss and adapter gradients on the device (fp32; and under bf16 autocast) vs CPU fp32,
  * `train_steps` AdamW steps under bf16 autocast at `train_batch` (losses must stay finite),
  * eval outputs of the trained model on the device vs a CPU fp32 copy (fp32 and bf16 autocast),
  * save_pretrained -> fresh base -> PeftModel.from_pretrained on the device and on CPU, vs the trained model,
  * merge_and_unload on the device vs the unmerged model and vs the same merge on CPU,
  * a bf16 copy of the base loading the fp32 adapter, vs CPU fp32.
  Every comparison is max|device - reference| <= tol * max|reference| with the tolerance stored next to it (fp32
  across devices: 1e-3, reduction order and kernels differ; same device, same arithmetic: 1e-5; bf16: 5e-2, 8
  mantissa bits through 12 layers; token merging under bf16: 1.5e-1, because bf16 keys flip near-tied bipartite
  matches, a discontinuous change that rounding bounds do not cover — the H200 run measured ToMe 0.033-0.036 and
  PYRA 0.056-0.124 against the 5e-2 of the other types). The CPU reference uses `ref_batch` inputs so it stays cheap at real size.
Pruning: ResRep and C-SGD callbacks driven as the Trainer drives them (bf16 autocast), then conversion/trim, the
  slimmed model vs its CPU copy and save_slimmed -> load_slimmed.
Speed (ratios in one run, median of `repeats` after warm-ups; CUDA events on GPUs, wall clock on CPU):
  token merging (ToMe r=16, PYRA low vs the unmerged ViT-B/16, images/s), TempMe vs meanP (videos/s; training step
  time and peak CUDA memory, full fine-tuning as in the paper's memory claim), Consolidator merged vs base,
  RLP/QPrompt/CoOp/LoRA training steps, ResNet-50 slimmed to the ResRep widths (~0.5 FLOPs) vs dense, each eager
  and under torch.compile. Sections run in order of value; one that would start after `--budget-s` is skipped and
  says so. The JSON is rewritten after every section.

    python benchmarks/device_check.py                      # CUDA if present, real sizes
    python benchmarks/device_check.py --device cpu --small # the same code paths at tiny sizes (CI)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.metadata
import json
import math
import platform
import re
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import device_cases as dc  # noqa: E402

TOL = {"fp32_cross_device": 1e-3, "same_device": 1e-5, "merge": 1e-4, "bf16": 5e-2, "bf16_token_merging": 1.5e-1}
REAL = dict(train_batch=32, ref_batch=2, train_steps=4, n_classes=100, text_len=77, frames=12, video_train_batch=4,
            speed_batches=[64, 256], compile_batches=[64, 256], video_speed_batch=16, video_memory_batch=8,
            prompt_speed_batch=32, repeats=10, warmup=3)
SMALL = dict(train_batch=4, ref_batch=2, train_steps=2, n_classes=5, text_len=16, frames=4, video_train_batch=2,
             speed_batches=[4, 8], compile_batches=[8], video_speed_batch=2, video_memory_batch=2,
             prompt_speed_batch=4, repeats=3, warmup=1)


# -- helpers ------------------------------------------------------------------------------------------------------
def rel_err(value: torch.Tensor, reference: torch.Tensor, norm: bool = False) -> float:
    """max|v - r| / max|r| (outputs), or ||v - r|| / ||r|| (`norm`: gradient vectors, whose largest entries are
    few and bf16 rounds each one)."""
    value, reference = value.detach().float().cpu(), reference.detach().float().cpu()
    if value.shape != reference.shape:
        return math.inf
    if norm:
        return float((value - reference).norm() / reference.norm().clamp_min(1e-12))
    return float((value - reference).abs().max() / reference.abs().max().clamp_min(1e-12))


def compare(value, reference, tol_key: str, norm: bool = False) -> dict:
    err = rel_err(value, reference, norm)
    return {"rel_err": err, "tol": TOL[tol_key], "metric": "norm" if norm else "max", "ok": bool(err <= TOL[tol_key])}


def attempt(entry: dict, key: str, fn) -> None:
    """entry[key] = fn(), or the error it raised (a failed check, not a failed section)."""
    try:
        entry[key] = fn()
    except Exception as err:  # noqa: BLE001
        entry[key] = {"ok": False, "error": f"{type(err).__name__}: {err}"[:600]}


def to(inputs: dict, device) -> dict:
    return {k: v.to(device) for k, v in inputs.items()}


def autocast(device, enabled: bool = True):
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=enabled)


def labels_for(logits: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(logits.shape[0] * 1000 + logits.shape[-1])
    return torch.randint(0, logits.shape[-1], (logits.shape[0],), generator=g).to(logits.device)


def ce_loss(logits: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels_for(logits))


def trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def grad_vector(model) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().cpu().flatten()
                      for _, p in trainable(model)])


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_fns(fns: dict, device, repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each function, timed in interleaved rounds (CUDA events on GPUs)."""
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end) / 1000)
            else:
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def device_name(device: str, small: bool) -> str:
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    return slug + ("_small" if small else "")


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("transformers", "peft", "accelerate", "safetensors"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError as err:
            out[pkg] = f"unavailable: {err}"
    out["cuda"] = torch.version.cuda
    out["threads"] = torch.get_num_threads()
    return out


class Report:
    """The result JSON, rewritten after every section; sections past the budget are recorded as skipped."""

    def __init__(self, path: Path, payload: dict, budget_s: float):
        self.path, self.payload, self.budget_s, self.start = path, payload, budget_s, time.perf_counter()
        payload["sections"] = {}
        self.write()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def run(self, name: str, fn, *args):
        if self.elapsed() > self.budget_s:
            self.payload["sections"][name] = {"skipped": f"time budget {self.budget_s:.0f}s spent"}
            print(f"[device_check] {name}: skipped (budget)", flush=True)
            self.write()
            return
        t0 = time.perf_counter()
        entry = {}
        try:
            fn(entry, *args)
        except Exception as err:  # noqa: BLE001  (record and move on: one run must give everything it can)
            entry["error"] = f"{type(err).__name__}: {err}"[:2000]
            entry["traceback"] = traceback.format_exc()[-3000:]
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        self.payload["sections"][name] = entry
        self.payload["elapsed_s"] = round(self.elapsed(), 1)
        status = "error: " + entry["error"][:200] if "error" in entry else "ok"
        print(f"[device_check] {name}: {entry['seconds']}s {status}", flush=True)
        self.write()

    def write(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.payload, indent=1, default=str) + "\n")


# -- correctness ------------------------------------------------------------------------------------------------------
def first_step(entry: dict, dev_model, cpu_model, case, inputs: dict, device):
    """Loss and gradients of one training step: device fp32 and device bf16-autocast vs CPU fp32."""
    cpu_model.train()
    cpu_model.zero_grad(set_to_none=True)
    loss_ref = ce_loss(case.output(cpu_model(**inputs)))
    loss_ref.backward()
    grad_ref = grad_vector(cpu_model)
    cpu_model.zero_grad(set_to_none=True)
    dev_model.train()
    for tag, amp in (("fp32", False), ("bf16", True)):
        dev_model.zero_grad(set_to_none=True)
        with autocast(device, amp):
            loss = ce_loss(case.output(dev_model(**to(inputs, device))))
        loss.backward()
        key = case.bf16_tol if amp else "fp32_cross_device"
        entry[f"step_loss_{tag}"] = compare(loss, loss_ref, key)
        entry[f"step_grad_{tag}"] = compare(grad_vector(dev_model), grad_ref, key, norm=True)
    dev_model.zero_grad(set_to_none=True)


def train_steps(model, case, inputs: dict, device, steps: int) -> list[float]:
    model.train()
    opt = torch.optim.AdamW([p for _, p in trainable(model)], lr=1e-3)
    losses = []
    for _ in range(steps):
        with autocast(device):
            loss = ce_loss(case.output(model(**inputs)))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    model.eval()
    return losses


@torch.no_grad()
def outputs(model, case, inputs, device, amp: bool = False) -> torch.Tensor:
    model.eval()
    with autocast(device, amp):
        return case.output(model(**to(inputs, device))).float()


def check_method(entry: dict, case, device: str, sizes: dict):
    from peft import PeftModel, get_peft_model

    base = case.make_model().eval()

    def fresh_peft():  # same adapter initialisation every call (a deepcopy would also copy hook closures as-is)
        torch.manual_seed(0)
        return get_peft_model(copy.deepcopy(base), case.make_config())

    cpu, dev = fresh_peft(), fresh_peft().to(device)
    ref_in, train_in = case.make_inputs(sizes["ref_batch"], ref=True), case.make_inputs(sizes["train_batch"])
    entry["settings"] = {**case.settings, "trainable_params": sum(p.numel() for _, p in trainable(cpu)),
                         "ref_batch": sizes["ref_batch"], "train_batch": sizes["train_batch"]}
    first_step(entry, dev, cpu, case, ref_in, device)
    del cpu
    losses = train_steps(dev, case, to(train_in, device), device, sizes["train_steps"])
    entry["train_losses_bf16"] = losses
    entry["train_finite"] = all(math.isfinite(v) for v in losses)
    out_dev = outputs(dev, case, ref_in, device)
    entry["trained_bf16_vs_fp32"] = compare(outputs(dev, case, ref_in, device, amp=True), out_dev, case.bf16_tol)
    dev.to("cpu")  # the trained model itself, moved: the CPU fp32 reference of the same computation
    out_ref = outputs(dev, case, ref_in, "cpu")
    dev.to(device)
    entry["trained_fp32_vs_cpu"] = compare(out_dev, out_ref, "fp32_cross_device")
    entry["moved_back_vs_before"] = compare(outputs(dev, case, ref_in, device), out_dev, "same_device")
    with tempfile.TemporaryDirectory() as tmp:
        dev.save_pretrained(tmp)
        loaded_dev = PeftModel.from_pretrained(copy.deepcopy(base).to(device), tmp).eval()
        loaded_cpu = PeftModel.from_pretrained(copy.deepcopy(base), tmp).eval()
        out_loaded = outputs(loaded_dev, case, ref_in, device)
        entry["reload_vs_trained"] = compare(out_loaded, out_dev, "same_device")
        entry["reload_vs_cpu_reload"] = compare(out_loaded, outputs(loaded_cpu, case, ref_in, "cpu"),
                                                "fp32_cross_device")

        def bf16_base():
            half = PeftModel.from_pretrained(copy.deepcopy(base).to(device, torch.bfloat16), tmp).eval()
            cast = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in ref_in.items()}
            with torch.no_grad():
                return compare(case.output(half(**to(cast, device))).float(), out_ref, case.bf16_tol)

        attempt(entry, "bf16_base_fp32_adapter_vs_cpu", bf16_base)
    if case.mergeable:
        def merge():
            merged_dev = loaded_dev.merge_and_unload().eval()
            merged_cpu = loaded_cpu.merge_and_unload().eval()
            out_merged = outputs(merged_dev, case, ref_in, device)
            entry["merged_vs_cpu_merged"] = compare(out_merged, outputs(merged_cpu, case, ref_in, "cpu"),
                                                    "fp32_cross_device")
            return compare(out_merged, out_loaded, "merge")

        attempt(entry, "merged_vs_unmerged", merge)
    entry["ok"] = entry["train_finite"] and all(v["ok"] for v in entry.values() if isinstance(v, dict) and "ok" in v)


# -- pruning callbacks ----------------------------------------------------------------------------------------------
class _Args:  # the TrainingArguments fields the callbacks read
    fsdp, deepspeed, max_grad_norm, logging_steps, output_dir = None, None, 0.0, 0, None


class _State:
    def __init__(self, max_steps):
        self.max_steps, self.num_train_epochs, self.global_step, self.stateful_callbacks = max_steps, 1, 0, {}
        self.is_world_process_zero = True


def _drive(model, callback, optimizer, inputs, device, steps) -> list[float]:
    state = _State(steps)
    callback.on_train_begin(_Args(), state, None, model=model, optimizer=optimizer)
    model.train()
    losses = []
    for step in range(steps):
        with autocast(device):
            loss = ce_loss(model(**inputs).logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        callback.on_pre_optimizer_step(_Args(), state, None, optimizer=optimizer)
        optimizer.step()
        state.global_step = step + 1
        callback.on_step_end(_Args(), state, None)
        losses.append(float(loss))
    return losses


def _slimmed_checks(entry, model, plan, ref_in, device):
    import peft_effadapt

    model.eval()
    cpu = copy.deepcopy(model).to("cpu").eval()
    with torch.no_grad():
        out = model(**to(ref_in, device)).logits.float()
        entry["slimmed_vs_cpu"] = compare(out, cpu(**ref_in).logits, "fp32_cross_device")
    with tempfile.TemporaryDirectory() as tmp:
        peft_effadapt.save_slimmed(model, plan, tmp)
        loaded = peft_effadapt.load_slimmed(tmp).to(device).eval()
        with torch.no_grad():
            entry["load_slimmed_vs_slimmed"] = compare(loaded(**to(ref_in, device)).logits, out, "same_device")
    entry["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6


def check_resrep(entry, device, sizes, small):
    import peft_effadapt
    from peft_effadapt import pruning

    model = dc.resnet_model(small).to(device)
    size = 32 if small else 224
    ref_in, train_in = {"pixel_values": dc.pixels(sizes["ref_batch"], size)}, {
        "pixel_values": dc.pixels(sizes["train_batch"], size, seed=5)}
    cb = peft_effadapt.ResRepCallback(flops_target=0.9 if small else 0.5, lasso_strength=1e-2, mask_interval=1, warmup_steps=0,
                                      begin_granularity=64, drop_masked_rows=True)
    cb.prepare(model, to(ref_in, device))
    cpu = copy.deepcopy(model).to("cpu")
    first = {}
    cpu.train(), model.train()
    loss_ref = ce_loss(cpu(**ref_in).logits)
    loss_ref.backward()
    loss = ce_loss(model(**to(ref_in, device)).logits)
    loss.backward()
    first["loss"] = compare(loss, loss_ref, "fp32_cross_device")
    first["grad"] = compare(grad_vector(model), grad_vector(cpu), "fp32_cross_device", norm=True)
    entry["step_fp32_vs_cpu"] = first
    del cpu
    opt = torch.optim.SGD(pruning.resrep_param_groups(model, lr=0.01), lr=0.01, momentum=0.9)
    entry["train_losses_bf16"] = _drive(model, cb, opt, to(train_in, device), device, sizes["train_steps"])
    entry["masked_flops_ratio"] = cb.masked_flops_ratio
    plan = cb.slim()
    entry["conversion_error"] = cb.conversion_error
    entry["final_flops_ratio"] = cb.final_flops_ratio
    _slimmed_checks(entry, model, plan, ref_in, device)


def check_csgd(entry, device, sizes, small):
    import peft_effadapt

    model = dc.resnet_model(small).to(device)
    size = 32 if small else 224
    ref_in, train_in = {"pixel_values": dc.pixels(sizes["ref_batch"], size)}, {
        "pixel_values": dc.pixels(sizes["train_batch"], size, seed=5)}
    cb = peft_effadapt.CentripetalSGDCallback(keep_ratio=0.5, centripetal_strength=3e-3, kmeans_n_init=1)
    opt = torch.optim.SGD(peft_effadapt.csgd_param_groups(model, lr=0.01), lr=0.01, momentum=0.9, nesterov=True)
    entry["train_losses_bf16"] = _drive(model, cb, opt, to(train_in, device), device, sizes["train_steps"])
    entry["deviation"] = cb.deviation()
    plan = cb.slim(model, to(ref_in, device), check=False)  # a few steps cannot converge the clusters
    _slimmed_checks(entry, model, plan, ref_in, device)


# -- speed ------------------------------------------------------------------------------------------------------------
COMPILE = {"backend": "inductor", "deadline": math.inf, "cost_s": 0.0}


def compile_allowed(compiled: bool) -> bool:
    """False once too little of the budget is left for another compilation (`cost_s`: a ViT-B-sized one)."""
    return not compiled or time.perf_counter() + COMPILE["cost_s"] <= COMPILE["deadline"]


def maybe_compile(model, compiled: bool):
    return torch.compile(model, backend=COMPILE["backend"]) if compiled else model


def images_per_s(entry, device, sizes, models: dict, size: int, batches: list[int], compiled: bool, per=1):
    key = "compiled" if compiled else "eager"
    out = entry.setdefault(key, {})
    fns_models = {name: maybe_compile(m, compiled) for name, m in models.items()}
    for batch in batches:
        if not compile_allowed(compiled):
            out[str(batch)] = {"skipped": "time budget"}
            continue
        x = dc.pixels(batch, size).to(device)

        def run(m, x=x):
            def fn():
                with torch.no_grad(), autocast(device):
                    m(pixel_values=x)
            return fn

        times = time_fns({n: run(m) for n, m in fns_models.items()}, device, sizes["repeats"], sizes["warmup"])
        first = next(iter(times))
        out[str(batch)] = {n: {"per_s": batch / per / t, "s": t, "speedup_vs_" + first: times[first] / t}
                           for n, t in times.items()}


def speed_token_merging(entry, device, sizes, small, compiled):
    from peft import get_peft_model

    import peft_effadapt

    cfg = dc.vit_config(small)
    torch.manual_seed(0)
    from transformers import ViTForImageClassification

    base = ViTForImageClassification(cfg).eval()
    r = 4 if small else 16
    models = {"unmerged": base.to(device),
              f"tome_r{r}": get_peft_model(copy.deepcopy(base), peft_effadapt.ToMeConfig(
                  merge_schedule=r, clamp_schedule=True)).eval(),
              "pyra_low": get_peft_model(copy.deepcopy(base), peft_effadapt.PYRAConfig(merge_schedule="low"))
              .merge_and_unload().eval()}
    entry["settings"] = {"model": "ViT-B/16" if not small else "tiny ViT", "autocast": "bf16", "tome_r": r,
                         "tome_clamp_schedule": True, "pyra": "low, LoRA merged"}
    images_per_s(entry, device, sizes, models, cfg.image_size,
                 sizes["compile_batches"] if compiled else sizes["speed_batches"], compiled)


def speed_consolidator(entry, device, sizes, small, compiled):
    from peft import get_peft_model
    from transformers import ViTForImageClassification

    import peft_effadapt

    cfg = dc.vit_config(small)
    torch.manual_seed(0)
    base = ViTForImageClassification(cfg).eval().to(device)
    peft_model = get_peft_model(copy.deepcopy(base), peft_effadapt.ConsolidatorConfig(init_weights=False)).eval()
    models = {"base": base, "consolidator_unmerged": peft_model,
              "consolidator_merged": copy.deepcopy(peft_model).merge_and_unload().eval()}
    images_per_s(entry, device, sizes, models, cfg.image_size, sizes["compile_batches"][-1:], compiled)


def speed_pruning(entry, device, sizes, small, compiled):
    from peft_effadapt import pruning

    dense = dc.resnet_model(small).eval().to(device)
    slim = copy.deepcopy(dense)
    groups = pruning.find_channel_groups(slim)
    size = 32 if small else 224
    one = {"pixel_values": dc.pixels(1, size).to(device)}
    if small:
        widths = {g.name: max(1, g.size // 2) for g in groups if g.internal and g.meta.get("role") == "block"}
    else:
        from pruning import resrep_widths  # benchmarks/pruning.py: the official ResRep ResNet-50 widths

        widths = resrep_widths()
    pruning.apply_plan(slim, pruning.plan_from_widths(slim, groups, widths))
    entry["flops_ratio"] = pruning.count_flops(slim, one) / pruning.count_flops(dense, one)
    images_per_s(entry, device, sizes, {"dense": dense, "slimmed": slim.eval()}, size, sizes["compile_batches"]
                 if compiled else sizes["speed_batches"], compiled)


def speed_tempme(entry, device, sizes, small, compiled):
    from peft import get_peft_model

    import peft_effadapt

    frames = sizes["frames"]
    small_cfg = dict(num_frames=frames, imgme_r=2, clip_merge_layers=[1], clip_group_sizes=[frames])
    merge = small_cfg if small else dict(num_frames=frames)
    none = dict(num_frames=frames, imgme_r=0, clip_merge_layers=[], clip_group_sizes=[],
                clip_position_embedding=False)
    vision = dc.vision_tower(small).eval().to(device)
    tempme = get_peft_model(copy.deepcopy(vision), peft_effadapt.TempMeConfig(**merge)).merge_and_unload().eval()
    size = vision.config.image_size
    images_per_s(entry, device, sizes, {"meanP": vision, "tempme": tempme}, size,
                 [sizes["video_speed_batch"] * frames], compiled, per=frames)
    del vision, tempme
    # training step (full fine-tuning, both towers, InfoNCE) and its peak CUDA memory
    key = "compiled" if compiled else "eager"
    clip_cfg = dc.clip_config(small, 32)
    from transformers import CLIPModel

    torch.manual_seed(0)
    clip = CLIPModel(clip_cfg)
    b = sizes["video_memory_batch"]
    videos = dc.pixels(b * frames, size).view(b, frames, 3, size, size).to(device)
    ids = dc.caption_ids(b, sizes["text_len"] if small else 32, small)["input_ids"].to(device)
    train = {}
    for name, spec in (("meanP", none), ("tempme", merge)):
        if not compile_allowed(compiled):
            train[name] = {"skipped": "time budget"}
            continue
        retrieval = peft_effadapt.CLIPVideoRetrieval(get_peft_model(
            copy.deepcopy(clip), peft_effadapt.TempMeConfig(lora_r=0, full_finetune=True, **spec))).to(device)
        opt = torch.optim.AdamW([p for p in retrieval.parameters() if p.requires_grad], lr=1e-6)
        fwd = maybe_compile(retrieval, compiled)

        def step(fwd=fwd, opt=opt):
            with autocast(device):
                loss = fwd(videos, ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()
        row = {}
        if torch.device(device).type == "cuda":
            sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            step()
            sync(device)
            row["peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
            row["peak_above_start_mb"] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        row["step_s"] = time_fns({"s": step}, device, max(2, sizes["repeats"] // 2), 1)["s"]
        train[name] = row
        del retrieval, opt, fwd
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    if all("step_s" in train[n] for n in ("meanP", "tempme")):
        train["speedup"] = train["meanP"]["step_s"] / train["tempme"]["step_s"]
    if all("peak_mb" in train[n] for n in ("meanP", "tempme")):
        train["memory_ratio_tempme_over_meanP"] = train["tempme"]["peak_mb"] / train["meanP"]["peak_mb"]
    entry.setdefault(key, {})["train_full_ft"] = train
    entry["settings"] = {"frames": frames, "speed_videos": sizes["video_speed_batch"], "train_videos": b,
                         "tempme": merge, "meanP": none, "autocast": "bf16", "model": "CLIP ViT-B/32" if not small
                         else "tiny CLIP"}


def speed_prompts(entry, device, sizes, small, compiled):
    from peft import LoraConfig, get_peft_model

    import peft_effadapt

    cases = {c.name: c for c in dc.cases(small, sizes["n_classes"], sizes["text_len"], sizes["frames"])}
    inputs = to(cases["coop"].make_inputs(sizes["prompt_speed_batch"]), device)
    base = cases["coop"].make_model()
    configs = {"coop": cases["coop"].make_config(), "rlp": cases["rlp"].make_config(),
               "qprompt-coop": cases["qprompt-coop"].make_config(), "qprompt-rlp": cases["qprompt-rlp"].make_config(),
               "lora": LoraConfig(r=8, target_modules=["q_proj", "v_proj"])}
    steps = {}
    keep = []
    for name, config in configs.items():
        if not compile_allowed(compiled) or (compiled and COMPILE["cost_s"] * (len(steps) + 1) > COMPILE[
                "deadline"] - time.perf_counter()):  # all compile in the first timing round: budget for all so far
            entry.setdefault("skipped", []).append(name)
            continue
        model = get_peft_model(copy.deepcopy(base), config).to(device).train()
        opt = torch.optim.AdamW([p for _, p in trainable(model)], lr=1e-4)
        fwd = maybe_compile(model, compiled)

        def step(fwd=fwd, opt=opt):
            with autocast(device):
                loss = ce_loss(fwd(**inputs).logits_per_image)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        steps[name] = step
        keep.append((model, opt))
    times = time_fns(steps, device, sizes["repeats"], sizes["warmup"])
    entry["compiled" if compiled else "eager"] = {n: {"step_s": t, "vs_coop": t / times["coop"] if "coop" in times
                                                     else None} for n, t in times.items()}
    entry["settings"] = {"images": sizes["prompt_speed_batch"], "classes": sizes["n_classes"],
                         "text_len": sizes["text_len"], "lora": "r=8 on q_proj, v_proj of both towers",
                         "autocast": "bf16", "peft_effadapt_version": peft_effadapt.__version__}


# -- main -------------------------------------------------------------------------------------------------------------
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="tiny models: the same code paths in minutes on a CPU")
    parser.add_argument("--budget-s", type=float, default=420.0, help="no section starts after this many seconds")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile speed sections")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of the compiled sections (aot_eager: the same tracing without "
                             "code generation, for a quick CPU run)")
    parser.add_argument("--compile-cost-s", type=float, default=45.0,
                        help="seconds one compilation may take: a compile that would end past the budget is skipped")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON",
                        help="override sizes, e.g. --set train_batch=8 'speed_batches=[64]'")
    parser.add_argument("--only", nargs="*", default=None, help="run only sections whose name starts with these")
    parser.add_argument("--out", default=None, help="result file (default benchmarks/results/device_<name>.json)")
    args = parser.parse_args(argv)
    COMPILE["backend"] = args.compile_backend
    COMPILE["deadline"] = time.perf_counter() + args.budget_s
    COMPILE["cost_s"] = 0.0 if args.small else args.compile_cost_s
    for name in ("cache_size_limit", "recompile_limit"):  # every model and batch is compiled once; never fall back
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 comparisons are fp32, not TF32
    torch.backends.cudnn.allow_tf32 = False
    sizes = dict(SMALL if args.small else REAL)
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in sizes:
            parser.error(f"--set {key}: unknown size; sizes are {sorted(sizes)}")
        sizes[key] = json.loads(value)
    name = device_name(args.device, args.small)
    path = Path(args.out) if args.out else Path(__file__).parent / "results" / f"device_{name}.json"
    payload = {"command": "python " + " ".join(sys.argv), "device": args.device, "device_name": name,
               "versions": versions(), "small": args.small, "budget_s": args.budget_s, "sizes": sizes,
               "tolerances": TOL, "tolerance_rule": "max|value - reference| <= tol * max|reference|",
               "tf32": False, "training_autocast": "bf16",
               "compile": None if args.no_compile else {"backend": args.compile_backend, "mode": "default"}}
    if torch.device(args.device).type == "cuda":
        payload["cuda_device"] = torch.cuda.get_device_name(args.device)
    report = Report(path, payload, args.budget_s)
    sections = []
    for case in dc.cases(args.small, sizes["n_classes"], sizes["text_len"], sizes["frames"]):
        sections.append((f"correctness/{case.name}", check_method, case, args.device, sizes))
    sections += [("correctness/resrep", check_resrep, args.device, sizes, args.small),
                 ("correctness/csgd", check_csgd, args.device, sizes, args.small)]
    speed = [("token_merging", speed_token_merging), ("tempme", speed_tempme), ("consolidator", speed_consolidator),
             ("prompts", speed_prompts), ("pruning", speed_pruning)]
    sections += [(f"speed_eager/{n}", fn, args.device, sizes, args.small, False) for n, fn in speed]
    if not args.no_compile:  # cheapest compilations and the papers' headline claims first
        order = ("token_merging", "pruning", "tempme", "consolidator", "prompts")
        sections += [(f"speed_compiled/{n}", dict(speed)[n], args.device, sizes, args.small, True) for n in order]
    for section, fn, *rest in sections:
        if args.only and not any(section.startswith(p) for p in args.only):
            continue
        report.run(section, fn, *rest)
        with contextlib.suppress(Exception):
            torch._dynamo.reset()
            if torch.device(args.device).type == "cuda":
                torch.cuda.empty_cache()
    payload["summary"] = summarize(payload["sections"])
    payload["elapsed_s"] = round(report.elapsed(), 1)
    report.write()
    print(json.dumps(payload["summary"], indent=1))
    print(f"wrote {path} in {payload['elapsed_s']}s")


def summarize(sections: dict) -> dict:
    out = {}
    for name, entry in sections.items():
        if "skipped" in entry:
            out[name] = "skipped"
        elif "error" in entry:
            out[name] = "error: " + entry["error"][:160]
        elif name.startswith("correctness/"):
            failed = [k for k, v in entry.items() if isinstance(v, dict) and v.get("ok") is False]
            out[name] = "ok" if not failed else "FAILED: " + ", ".join(failed)
        else:
            out[name] = "measured"
    return out


if __name__ == "__main__":
    main()
