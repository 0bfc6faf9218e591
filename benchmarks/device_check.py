"""Device check: what a GPU user runs, measured and checked in one command. Every PEFT type and both pruning
callbacks trained, saved, reloaded and merged on one device and compared with the same computation on CPU fp32; speed
ratios of the efficient models eager, compiled and as CUDA graphs.

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
  slimmed model vs its CPU copy and save_slimmed -> load_slimmed (as saved; and with the GPU defaults, channels_last
  on CUDA).
Speed (device_speed.py; ratios in one run, each efficient model against the unmodified one in the SAME mode, bf16
  weights and inputs, medians of `repeats` interleaved calls after warm-ups; CUDA events on GPUs, wall clock on CPU):
  token merging (ToMe r=16, PYRA low merged and unmerged vs ViT-B/16, images/s at batch 64 and 256), the slimmed
  ResNet-50 (all groups at <= 0.5 FLOPs with widths aligned for the device, `round_to="auto"`, reloaded by
  `load_slimmed`; and the official ResRep internal widths) vs dense, all channels_last, TempMe vs meanP (CLIP B/32,
  16 videos of 12 frames, videos/s), Consolidator merged vs ViT-B/16, CoOp / RLP / QPrompt (merged; unmerged eager)
  vs CLIP B/16 with 100 class prompts; training steps eagerly (TempMe full fine-tuning time and peak memory,
  CoOp/RLP/QPrompt/LoRA).
Modes (`--modes`): "eager"; "reduce-overhead" = `peft_effadapt.compile_for_inference(model,
  mode="reduce-overhead")`: one graph (fullgraph), static shapes, replayed as a CUDA graph (the GPU mode; on a CPU it
  compiles without graphs); "default" = `compile_for_inference(model)`: inductor kernels launched one by one. Each
  compiled section records each model's first-call (compile) seconds and graphs (one, plus one per hook on the
  top-level module, which runs as its own frame: TempMe's video hooks) and `recompiles`, the graphs that the
  repeated calls compiled (0: a repeated batch never recompiles). `--compile-backend aot_eager` (the CI run) captures the same graphs with `torch.compile(
  fullgraph=True, dynamic=False)` without code generation.
Schedule and budget (`--plan` prints it with the estimates): merging first (eager, then reduce-overhead at 64 and
  256), then pruning, TempMe, the QPrompt device re-run, the rest; then the other compiled modes, the extra compiled
  models (unmerged PYRA, ResRep widths), the other correctness checks and the training steps. A section that would
  end after `--budget-s`, or a compile estimated (in units of `--compile-cost-s`, one ViT-B/16 forward compile,
  ~20 s on the H200 run) to do so, is skipped and says so; the JSON is rewritten after every section.
  `benchmarks/device_table.py <json>` turns the result into the README's GPU table (markdown, naming the device).

    python benchmarks/device_check.py --budget-s 420 --out benchmarks/results/device_<gpu>.json  # CUDA, real sizes
    python benchmarks/device_check.py --device cpu --small --compile-backend aot_eager  # tiny sizes (CI)
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
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import device_cases as dc  # noqa: E402
import device_speed as ds  # noqa: E402
from device_cases import autocast, ce_loss, to, trainable  # noqa: E402

TOL = {"fp32_cross_device": 1e-3, "same_device": 1e-5, "merge": 1e-4, "bf16": 5e-2, "bf16_token_merging": 1.5e-1}
REAL = dict(train_batch=32, ref_batch=2, train_steps=4, n_classes=100, text_len=77, frames=12, video_train_batch=4,
            speed_batches=[64, 256], video_speed_batch=16, video_memory_batch=8, prompt_speed_batch=32, repeats=10,
            warmup=3)
SMALL = dict(train_batch=4, ref_batch=2, train_steps=2, n_classes=5, text_len=16, frames=4, video_train_batch=2,
             speed_batches=[4, 8], video_speed_batch=2, video_memory_batch=2, prompt_speed_batch=4, repeats=3,
             warmup=1)


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


def grad_vector(model) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().cpu().flatten()
                      for _, p in trainable(model)])


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

    def run(self, name: str, fn, *args, need_s: float = 0.0):
        """Runs `fn(entry, *args)` unless the section would end past the budget (it needs at least `need_s`)."""
        left = self.budget_s - self.elapsed()
        if need_s > left:
            self.payload["sections"][name] = {"skipped": f"time budget: needs ~{need_s:.0f}s, {max(left, 0):.0f}s "
                                                         f"of {self.budget_s:.0f}s left"}
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
        loaded = peft_effadapt.load_slimmed(tmp, device=device, channels_last=False)
        placed = peft_effadapt.load_slimmed(tmp, device=device)  # the GPU defaults: channels_last on CUDA
        with torch.no_grad():
            entry["load_slimmed_vs_slimmed"] = compare(loaded(**to(ref_in, device)).logits, out, "same_device")
            entry["load_slimmed_defaults_vs_slimmed"] = compare(placed(**to(ref_in, device)).logits, out,
                                                                "fp32_cross_device")  # another conv kernel
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


# -- the schedule -----------------------------------------------------------------------------------------------------
# GPU seconds of the sections that compile nothing, from the H200 run (eager speed sections: 3-9 s per case for both
# batches, models built included; correctness 3-18 s per type; the TempMe training step with its compiled twin 192 s)
EAGER_S = {"token_merging": 5, "pruning": 8, "tempme": 4, "consolidator": 4, "prompts": 8}
CORRECTNESS_S = {"consolidator": 11, "tempme": 18, "qprompt-maple": 10}  # others: DEFAULT_S
DEFAULT_S, TRAIN_S = 8, 15


def schedule(device: str, sizes: dict, small: bool, modes: list[str], cost_s: float) -> list[tuple]:
    """Every section as (name, least seconds it needs, full estimate, function, *args), in the order they run:
    the headline ratios in eager and the first compiled mode (merging, pruning, TempMe), the QPrompt device fix,
    then the rest; the other compiled modes; the extra compiled models; the other correctness checks and training
    steps. The estimates are for an H100/H200 (`cost_s`: one ViT-B/16 forward compile)."""
    fast, big = sizes["speed_batches"][0], sizes["speed_batches"][-1]
    videos = sizes["video_speed_batch"]
    compiled_modes = [m for m in modes if m != "eager"]
    first = compiled_modes[:1]

    def speed(case, mode, batch, extra=False):
        name = f"speed/{case}/{mode}/b{batch}" + ("/extra" if extra else "")
        if mode == "eager":
            least = full = EAGER_S[case]
        else:
            least, full = (u * cost_s for u in ds.compile_units(case, extra))
        return name, least, full, ds.speed, case, device, sizes, small, mode, batch, extra

    def eager(case, *batches):
        return [speed(case, "eager", b) for b in batches] if "eager" in modes else []

    cases = {c.name: c for c in dc.cases(small, sizes["n_classes"], sizes["text_len"], sizes["frames"])}

    def correctness(name):
        need = CORRECTNESS_S.get(name, DEFAULT_S)
        return f"correctness/{name}", need, need, check_method, cases[name], device, sizes

    out = [*eager("token_merging", fast, big), *[speed("token_merging", m, fast) for m in first],
           *[speed("token_merging", m, big) for m in first],
           *eager("pruning", big, fast), *[speed("pruning", m, big) for m in first],
           *eager("tempme", videos), *[speed("tempme", m, videos) for m in first],
           *[correctness(n) for n in ("qprompt-coop", "qprompt-rlp", "qprompt-maple")],
           *[speed("pruning", m, fast) for m in first]]
    for case in ("consolidator", "prompts"):
        out += [*eager(case, fast, big), *[speed(case, m, b) for m in first for b in (fast, big)]]
    for mode in compiled_modes[1:]:
        out += [speed("token_merging", mode, b) for b in (fast, big)] + [speed("pruning", mode, b) for b in (big, fast)]
        out += [speed("tempme", mode, videos)] + [speed(c, mode, b) for c in ("consolidator", "prompts")
                                                 for b in (fast, big)]
    out += [speed(case, m, b, extra=True) for m in first for case in ("token_merging", "pruning") for b in (fast, big)]
    out += [correctness(n) for n in cases if not n.startswith("qprompt")]
    out += [("correctness/resrep", DEFAULT_S, DEFAULT_S, check_resrep, device, sizes, small),
            ("correctness/csgd", DEFAULT_S, DEFAULT_S, check_csgd, device, sizes, small),
            ("train/tempme", TRAIN_S, TRAIN_S, ds.train_tempme, device, sizes, small),
            ("train/prompts", TRAIN_S, TRAIN_S, ds.train_prompts, device, sizes, small)]
    return out


# -- main -------------------------------------------------------------------------------------------------------------
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="tiny models: the same code paths in minutes on a CPU")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="no section (and no compile) starts that is estimated to end after this many seconds")
    parser.add_argument("--modes", nargs="+", default=list(ds.MODES), choices=ds.MODES,
                        help="speed modes; the first compiled one is measured first (default: %(default)s)")
    parser.add_argument("--no-compile", action="store_true", help="eager speed sections only")
    parser.add_argument("--compile-backend", default="inductor",
                        help="inductor: compile_for_inference; another backend (aot_eager: the same capture without "
                             "code generation, for a quick CPU run) compiles with torch.compile(fullgraph=True)")
    parser.add_argument("--compile-cost-s", type=float, default=20.0,
                        help="seconds of one ViT-B/16 forward compile (the unit of the compile estimates; ~20 s on "
                             "the H200 run); 0 with --small")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON",
                        help="override sizes, e.g. --set train_batch=8 'speed_batches=[64]'")
    parser.add_argument("--only", nargs="*", default=None, help="run only sections whose name starts with these")
    parser.add_argument("--plan", action="store_true", help="print the schedule with its time estimates and exit")
    parser.add_argument("--out", default=None, help="result file (default benchmarks/results/device_<name>.json)")
    args = parser.parse_args(argv)
    modes = ["eager"] if args.no_compile else list(dict.fromkeys(args.modes))
    cost_s = 0.0 if args.small else args.compile_cost_s
    sizes = dict(SMALL if args.small else REAL)
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in sizes:
            parser.error(f"--set {key}: unknown size; sizes are {sorted(sizes)}")
        sizes[key] = json.loads(value)
    sections = [s for s in schedule(args.device, sizes, args.small, modes, args.compile_cost_s)
                if not args.only or any(s[0].startswith(p) for p in args.only)]
    if args.plan:
        print_plan(sections, args.budget_s)
        return
    ds.SETTINGS.update(backend=args.compile_backend, cost_s=cost_s, deadline=time.perf_counter() + args.budget_s)
    for name in ("cache_size_limit", "recompile_limit"):  # every model and batch is compiled once; never fall back
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 comparisons are fp32, not TF32
    torch.backends.cudnn.allow_tf32 = False
    name = device_name(args.device, args.small)
    path = Path(args.out) if args.out else Path(__file__).parent / "results" / f"device_{name}.json"
    payload = {"command": "python " + " ".join(sys.argv), "device": args.device, "device_name": name,
               "versions": versions(), "small": args.small, "budget_s": args.budget_s, "sizes": sizes,
               "tolerances": TOL, "tolerance_rule": "max|value - reference| <= tol * max|reference|",
               "tf32": False, "training_autocast": "bf16", "speed_dtype": "bfloat16",
               "compile": {"backend": args.compile_backend, "modes": modes, "compile_cost_s": cost_s,
                           "fullgraph": True, "dynamic": False}}
    if torch.device(args.device).type == "cuda":
        payload["cuda_device"] = torch.cuda.get_device_name(args.device)
    report = Report(path, payload, args.budget_s)
    for section, least, _, fn, *rest in sections:
        report.run(section, fn, *rest, need_s=0.0 if args.small else least)
        with contextlib.suppress(Exception):
            torch._dynamo.reset()
            if torch.device(args.device).type == "cuda":
                torch.cuda.empty_cache()
    payload["summary"] = summarize(payload["sections"])
    payload["elapsed_s"] = round(report.elapsed(), 1)
    report.write()
    print(json.dumps(payload["summary"], indent=1))
    print(f"wrote {path} in {payload['elapsed_s']}s")


def print_plan(sections: list[tuple], budget_s: float) -> None:
    """The schedule with each section's least and full estimate and the running total of the full estimates."""
    total = 0.0
    print(f"{'section':58} {'least s':>8} {'full s':>7} {'total s':>8}")
    for name, least, full, *_ in sections:
        total += full
        print(f"{name:58} {least:8.0f} {full:7.0f} {total:8.0f}{'  (past the budget)' if total > budget_s else ''}")


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
