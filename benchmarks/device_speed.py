"""Speed sections of the device check: each efficient model against the unmodified one in the SAME mode, dtype,
layout and batch, timed in one interleaved loop (bf16 weights and inputs; CUDA events on GPUs, wall clock on CPU).

Modes: "eager"; "reduce-overhead" (`peft_effadapt.compile_for_inference(model, mode="reduce-overhead")`: one graph,
static shapes, replayed as a CUDA graph on GPUs — the GPU mode; on a CPU it compiles without graphs); "default"
(`compile_for_inference(model)`: inductor kernels, launched one by one). Another `backend` (the CI run's aot_eager)
compiles with `torch.compile(fullgraph=True, dynamic=False)` instead: the same capture without code generation.

Every compiled model is first called once alone (its compile time is recorded as `first_call_s`) and skipped when its
estimated compile time (`MODELS` units x `SETTINGS["cost_s"]`, the seconds of one ViT-B/16 forward compile) would end
past the deadline; the unmodified model is compiled first, so a ratio is either measured or not at all.
"""

from __future__ import annotations

import copy
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import device_cases as dc  # noqa: E402

from common import inference, interleaved_medians, training_step  # noqa: E402

MODES = ("eager", "reduce-overhead", "default")
SETTINGS = {"backend": "inductor", "deadline": math.inf, "cost_s": 0.0}  # set by device_check.main
DTYPE = torch.bfloat16


# Per case, per model (the unmodified reference first): its estimated compile time in ViT-B/16 forward compiles (ToMe
# and PYRA trace 574 and 970 more aten ops than the ViT's forward) and how it is timed: "headline" in every mode,
# "extra" compiled only in the extra sections (which run after every headline ratio), "eager" eagerly only (graph
# breaks, or a training-time structure nobody deploys).
MODELS = {
    "token_merging": {"vit": (1.0, "headline"), "tome": (2.5, "headline"), "pyra_low_merged": (3.0, "headline"),
                      "pyra_low": (3.5, "extra")},
    "pruning": {"dense": (0.9, "headline"), "slimmed_aligned": (0.9, "headline"), "resrep_internal": (0.9, "extra")},
    "tempme": {"meanP": (1.0, "headline"), "tempme": (2.5, "headline")},
    "consolidator": {"vit": (1.0, "headline"), "consolidator_merged": (1.0, "headline"),
                     "consolidator_unmerged": (0.0, "eager")},
    "prompts": {"clip": (1.6, "headline"), "coop": (2.0, "headline"), "rlp": (2.0, "headline"),
                "qprompt-rlp_merged": (1.6, "headline"), "qprompt-coop": (0.0, "eager"),
                "qprompt-maple": (0.0, "eager")},
}


def compile_units(case: str, extra: bool = False) -> tuple[float, float]:
    """Estimated compile time of a compiled section of `case` in ViT-B/16 compiles: (the least that gives a ratio —
    the reference and the first model —, all its models)."""
    (_, (first, _)), *rest = MODELS[case].items()
    units = [u for _, (u, kind) in rest if kind == ("extra" if extra else "headline")]
    return first + (units[0] if units else 0.0), first + sum(units)


def timed_in(case: str, mode: str, extra: bool) -> list[str]:
    """The models of `case` timed in a section of `mode` (eager: all; compiled: the reference and the headline or
    extra models)."""
    names = list(MODELS[case])
    kinds = {"eager": ("headline", "extra", "eager")}.get(mode, ("extra",) if extra else ("headline",))
    return [n for n in names if n == names[0] or MODELS[case][n][1] in kinds]


@dataclass
class Bench:
    """The models of one case (`MODELS[case]` order), their inputs for a batch, and settings."""

    case: str
    models: dict[str, nn.Module]
    inputs: Callable[[int], dict]
    settings: dict


def compiled(model: nn.Module, mode: str):
    """`model` as a user runs it in `mode` (see the module docstring)."""
    model.eval()
    if mode == "eager":
        return model
    if SETTINGS["backend"] == "inductor":
        import peft_effadapt

        return peft_effadapt.compile_for_inference(model, mode=mode)
    return torch.compile(model, backend=SETTINGS["backend"], fullgraph=True, dynamic=False)


def fits(seconds: float) -> bool:
    return time.perf_counter() + seconds <= SETTINGS["deadline"]


def graphs_compiled() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def measure(entry: dict, bench: Bench, device, sizes: dict, mode: str, batch: int, extra: bool = False) -> None:
    """Fills `entry` with items/s, seconds and the speed-up over the reference of the models `timed_in` the section
    at `batch` in `mode` (a model whose compile would overrun the deadline is recorded as skipped)."""
    cuda = torch.device(device).type == "cuda"
    marker = torch.compiler.cudagraph_mark_step_begin if cuda and mode == "reduce-overhead" else None
    inputs = dc.to(bench.inputs(batch), device, DTYPE)
    names = timed_in(bench.case, mode, extra)
    reference, rows, fns = names[0], {}, {}
    for name in names:
        estimate = 0.0 if mode == "eager" else MODELS[bench.case][name][0] * SETTINGS["cost_s"]
        if (name != reference and reference not in fns) or not fits(estimate):
            rows[name] = {"skipped": f"time budget (compile estimated at {estimate:.0f}s)"}
            continue
        fn = inference(compiled(bench.models[name], mode), before=marker, **inputs)
        graphs, start = graphs_compiled(), time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        rows[name] = {"first_call_s": round(time.perf_counter() - start, 2)}
        if mode != "eager":
            rows[name]["graphs"] = graphs_compiled() - graphs  # fullgraph: one, plus one per top-level hook
        fns[name] = fn
    graphs = graphs_compiled()
    if len(fns) > 1:
        times = interleaved_medians(fns, sizes["repeats"], sizes["warmup"], device)
        for name, seconds in times.items():
            rows[name].update(per_s=batch / seconds, s=seconds, speedup=times[reference] / seconds)
    entry.update(mode=mode, batch=batch, reference=reference, dtype=str(DTYPE).removeprefix("torch."),
                 results=rows, settings=bench.settings)
    if mode != "eager":
        entry["recompiles"] = graphs_compiled() - graphs  # graphs compiled by the repeated calls: must be 0


# -- the cases ------------------------------------------------------------------------------------------------------
def token_merging(device, sizes: dict, small: bool) -> Bench:
    """ToMe r=16 (clamped as the reference ToMe), PYRA "low" (merged, and with its LoRA unmerged) vs ViT-B/16."""
    from peft import get_peft_model

    import peft_effadapt

    base = dc.vit(small).eval()
    r = 4 if small else 16
    pyra = get_peft_model(copy.deepcopy(base), peft_effadapt.PYRAConfig(merge_schedule="low")).eval()
    models = {"vit": base,
              "tome": get_peft_model(copy.deepcopy(base), peft_effadapt.ToMeConfig(merge_schedule=r,
                                                                                     clamp_schedule=True)),
              "pyra_low_merged": copy.deepcopy(pyra).merge_and_unload(), "pyra_low": pyra}
    size = dc.vit_config(small).image_size
    return Bench("token_merging", on(models, device), lambda batch: {"pixel_values": dc.pixels(batch, size)},
                 {"model": "tiny ViT" if small else "ViT-B/16", "tome_r": r, "tome_clamp_schedule": True,
                  "pyra": "low"})


def pruning(device, sizes: dict, small: bool) -> Bench:
    """ResNet-50 slimmed to <= 0.5 FLOPs with uniform widths over all groups aligned for the device (round_to="auto",
    reloaded with load_slimmed), and to the official ResRep internal widths (unaligned), vs the dense model; all in
    channels_last."""
    from peft_effadapt import pruning as pr

    dense = dc.resnet_model(small).eval()
    size = 32 if small else 224
    one = {"pixel_values": dc.pixels(1, size)}
    groups = pr.find_channel_groups(dense)
    widths = pr.widths_for_flops(dense, one, 0.5, groups="all", round_to="auto", device=device)
    plan = pr.plan_from_widths(dense, groups, widths, round_to="auto", device=device)
    with tempfile.TemporaryDirectory() as tmp:
        pr.save_slimmed(pr.apply_plan(copy.deepcopy(dense), plan), plan, tmp)
        aligned = pr.load_slimmed(tmp, device=device, dtype=DTYPE, channels_last=True)
    if small:
        internal = {g.name: max(1, g.size // 2) for g in groups if g.internal and g.meta.get("role") == "block"}
    else:
        from pruning import resrep_widths  # benchmarks/pruning.py: the official ResRep ResNet-50 widths

        internal = resrep_widths()
    official = pr.apply_plan(copy.deepcopy(dense), pr.plan_from_widths(dense, groups, internal))
    flops = pr.FlopsModel.measure(dense, one, groups)
    settings = {"model": "tiny ResNet" if small else "ResNet-50", "layout": "channels_last", "round_to": plan.round_to,
                "flops_ratio": {"slimmed_aligned": flops.ratio(plan.widths), "resrep_internal": flops.ratio(internal)}}
    models = on({"dense": dense, "slimmed_aligned": aligned, "resrep_internal": official}, device)
    for model in models.values():
        model.to(memory_format=torch.channels_last)

    def inputs(batch):
        return {"pixel_values": dc.pixels(batch, size).contiguous(memory_format=torch.channels_last)}

    return Bench("pruning", models, inputs, settings)


def tempme(device, sizes: dict, small: bool) -> Bench:
    """TempMe (merged) vs meanP (the plain CLIP vision tower) on `batch` videos of `frames` frames: videos/s."""
    from peft import get_peft_model

    import peft_effadapt

    frames = sizes["frames"]
    merge = tempme_settings(small, frames)
    vision = dc.vision_tower(small).eval()
    merged = get_peft_model(copy.deepcopy(vision), peft_effadapt.TempMeConfig(**merge)).merge_and_unload()
    size = vision.config.image_size
    return Bench("tempme", on({"meanP": vision, "tempme": merged}, device),
                 lambda videos: {"pixel_values": dc.pixels(videos * frames, size)},
                 {"model": "tiny CLIP" if small else "CLIP ViT-B/32", "frames": frames, "tempme": merge,
                  "unit": "videos"})


def consolidator(device, sizes: dict, small: bool) -> Bench:
    """Consolidator merged (and unmerged, eager only) vs the ViT-B/16 it was trained on."""
    from peft import get_peft_model

    import peft_effadapt

    base = dc.vit(small).eval()
    peft_model = get_peft_model(copy.deepcopy(base), peft_effadapt.ConsolidatorConfig(init_weights=False)).eval()
    size = dc.vit_config(small).image_size
    return Bench("consolidator", on({"vit": base, "consolidator_merged": copy.deepcopy(peft_model).merge_and_unload(),
                                     "consolidator_unmerged": peft_model}, device),
                 lambda batch: {"pixel_values": dc.pixels(batch, size)},
                 {"model": "tiny ViT" if small else "ViT-B/16"})


def prompts(device, sizes: dict, small: bool) -> Bench:
    """CLIP ViT-B/16 inference (images + `n_classes` class prompts) with CoOp, RLP, QPrompt (merged; unmerged eager
    only: its quantiser breaks the graph) and MaPLe-hosted QPrompt (eager) vs the unmodified CLIP."""
    from peft import get_peft_model

    cases = {c.name: c for c in dc.cases(small, sizes["n_classes"], sizes["text_len"], sizes["frames"])}
    base = cases["coop"].make_model().eval()

    def peft(name):
        return get_peft_model(copy.deepcopy(base), cases[name].make_config()).eval()

    models = {"clip": base, "coop": peft("coop"), "rlp": peft("rlp"),
              "qprompt-rlp_merged": peft("qprompt-rlp").merge_and_unload(), "qprompt-coop": peft("qprompt-coop"),
              "qprompt-maple": peft("qprompt-maple")}
    return Bench("prompts", on(models, device), cases["coop"].make_inputs,
                 {"model": "tiny CLIP" if small else "CLIP ViT-B/16", "classes": sizes["n_classes"],
                  "text_len": sizes["text_len"]})


CASES = {"token_merging": token_merging, "pruning": pruning, "tempme": tempme, "consolidator": consolidator,
         "prompts": prompts}
_BUILT: dict[str, Bench] = {}


def speed(entry: dict, case: str, device, sizes: dict, small: bool, mode: str, batch: int,
          extra: bool = False) -> None:
    """One speed section: `case` in `mode` at `batch` (the case's models are built once and kept for its other
    sections)."""
    if case not in _BUILT:  # all cases together hold a few GB of bf16 weights
        _BUILT[case] = CASES[case](device, sizes, small)
    measure(entry, _BUILT[case], device, sizes, mode, batch, extra)



def on(models: dict[str, nn.Module], device) -> dict[str, nn.Module]:
    for model in models.values():
        model.to(device=device, dtype=DTYPE)
    return models


def tempme_settings(small: bool, frames: int) -> dict:
    if small:
        return dict(num_frames=frames, imgme_r=2, clip_merge_layers=[1], clip_group_sizes=[frames])
    return dict(num_frames=frames)  # the paper's ViT-B/32 setting


# -- training steps (eager, bf16 autocast) ------------------------------------------------------------------------
def train_tempme(entry: dict, device, sizes: dict, small: bool) -> None:
    """Full fine-tuning step (both towers, InfoNCE) of TempMe vs meanP: seconds and peak CUDA memory."""
    from peft import get_peft_model

    import peft_effadapt

    frames, b = sizes["frames"], sizes["video_memory_batch"]
    merge = tempme_settings(small, frames)
    none = dict(num_frames=frames, imgme_r=0, clip_merge_layers=[], clip_group_sizes=[], clip_position_embedding=False)
    clip = dc.clip(small, 32)
    size = clip.config.vision_config.image_size
    videos = dc.pixels(b * frames, size).view(b, frames, 3, size, size).to(device)
    ids = dc.caption_ids(b, sizes["text_len"] if small else 32, small)["input_ids"].to(device)
    rows = {}
    for name, spec in (("meanP", none), ("tempme", merge)):
        retrieval = peft_effadapt.CLIPVideoRetrieval(get_peft_model(
            copy.deepcopy(clip), peft_effadapt.TempMeConfig(lora_r=0, full_finetune=True, **spec))).to(device)
        opt = torch.optim.AdamW([p for p in retrieval.parameters() if p.requires_grad], lr=1e-6)
        step = training_step(lambda r=retrieval: r(videos, ids).loss, opt, context=lambda: dc.autocast(device))
        step()
        row = {}
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            step()
            torch.cuda.synchronize()
            row["peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
            row["peak_above_start_mb"] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        row["step_s"] = interleaved_medians({"s": step}, max(2, sizes["repeats"] // 2), 1, device)["s"]
        rows[name] = row
        del retrieval, opt, step
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    rows["speedup"] = rows["meanP"]["step_s"] / rows["tempme"]["step_s"]
    if "peak_mb" in rows["meanP"]:
        rows["memory_ratio_tempme_over_meanP"] = rows["tempme"]["peak_mb"] / rows["meanP"]["peak_mb"]
    entry.update(results=rows, settings={"frames": frames, "videos": b, "tempme": merge, "meanP": none,
                                         "autocast": "bf16", "model": "tiny CLIP" if small else "CLIP ViT-B/32"})


def train_prompts(entry: dict, device, sizes: dict, small: bool) -> None:
    """Training step of CoOp, RLP, QPrompt (CoOp and RLP hosts) and LoRA r=8 on CLIP ViT-B/16, relative to CoOp."""
    from peft import LoraConfig, get_peft_model

    cases = {c.name: c for c in dc.cases(small, sizes["n_classes"], sizes["text_len"], sizes["frames"])}
    inputs = dc.to(cases["coop"].make_inputs(sizes["prompt_speed_batch"]), device)
    base = cases["coop"].make_model()
    configs = {name: cases[name].make_config() for name in ("coop", "rlp", "qprompt-coop", "qprompt-rlp")}
    configs["lora"] = LoraConfig(r=8, target_modules=["q_proj", "v_proj"])
    steps, keep = {}, []
    for name, config in configs.items():
        model = get_peft_model(copy.deepcopy(base), config).to(device).train()
        opt = torch.optim.AdamW([p for _, p in dc.trainable(model)], lr=1e-4)
        steps[name] = training_step(lambda m=model: dc.ce_loss(m(**inputs).logits_per_image), opt,
                                    context=lambda: dc.autocast(device))
        keep.append((model, opt))
    times = interleaved_medians(steps, sizes["repeats"], sizes["warmup"], device)
    entry.update(results={n: {"step_s": t, "vs_coop": t / times["coop"]} for n, t in times.items()},
                 settings={"images": sizes["prompt_speed_batch"], "classes": sizes["n_classes"],
                           "text_len": sizes["text_len"], "lora": "r=8 on q_proj, v_proj of both towers",
                           "autocast": "bf16"})
