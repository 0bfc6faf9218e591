"""Host cost of token merging: aten ops and host milliseconds per forward that merging adds to a ViT.

At a tiny width (compute negligible), batch 1 and 1 thread, a forward's time is the host's: one Python dispatch per
aten op, which on a GPU in eager mode is one kernel launch each. So the ops and ms that a merging method adds over
the unmerged model are the CPU proxy of what it costs a GPU in eager mode (issue 25, DESIGN.md "Fast where it runs").

Cases (random weights, 12 layers, width 32, 2 heads, sdpa attention):
* ViT, 224 px, patch 16 -> 197 tokens: unmerged; ToMe r=16; PYRA low unmerged (LoRA r=8 applied as a delta) and
  merged (LoRA folded into q/k/v: the deployed form).
* CLIP vision, ViT-B/32 video case (224 px, patch 32 -> 50 tokens, 12 frames, one video): meanP (every frame
  through the plain tower) vs TempMe's default schedule (ImgMe r=2, clip merges in layers 8-9-10 with groups 2-2-3,
  intra-clip merging after), LoRA folded.
* With `import timm, tome` working: timm's vit_base_patch16_224 at the same tiny width, plain vs
  `tome.patch.timm` with r=16 (the reference implementation); skipped with a note otherwise.

Ops are counted with a TorchDispatchMode (every aten call of one no-grad forward); host ms is the median of
--repeats forwards, timed in interleaved rounds (benchmarks/common.py) so that drift hits all cases alike; the load
average is stored with it. Added = method - its unmerged model.

    python benchmarks/merging_ops.py [--repeats 21] [--label after]
        -> results/merging_ops.json (the run is stored under --label; other labels in the file are kept)

With --vit-b16 (issue 25's CPU goal): ViT-B/16, random weights, batch --batch, --threads threads: images/s of the
unmerged model, ToMe r=16 and merged PYRA low, eager and compiled with `compile_for_inference` (inductor; each
compiled model checked against eager), interleaved medians of --repeats in one run; speed-ups against the
unmerged model in the same mode, and compiled over eager.

    python benchmarks/merging_ops.py --vit-b16 [--threads 2] [--batch 8] [--repeats 21] [--label quiet]

With --compare-with DIR (another checkout, e.g. `git worktree add DIR <commit>`): the host-cost table of DIR's
code ("other") and of this checkout ("this"), from alternating subprocesses, --rounds each; medians over rounds.

    python benchmarks/merging_ops.py --compare-with DIR [--rounds 3] [--label "before vs after"]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from peft import get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import CLIPVisionConfig, CLIPVisionModel, ViTConfig, ViTModel

from peft_effadapt import PYRAConfig, TempMeConfig, ToMeConfig, compile_for_inference

from common import RESULTS, interleaved_medians, write_result

TINY = dict(hidden_size=32, num_hidden_layers=12, num_attention_heads=2, intermediate_size=64, image_size=224)
RESULT = RESULTS / "merging_ops.json"


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while active."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def count_ops(model, x) -> int:
    with torch.no_grad(), OpCounter() as counter:
        model(x)
    return counter.ops


def forward(model, x):
    def run():
        with torch.no_grad():
            model(x)

    return run


def vit() -> ViTModel:
    torch.manual_seed(0)
    return ViTModel(ViTConfig(patch_size=16, **TINY), add_pooling_layer=False).eval()


def clip_vision() -> CLIPVisionModel:
    torch.manual_seed(0)
    return CLIPVisionModel(CLIPVisionConfig(patch_size=32, **TINY)).eval()


def peft(model, config, merged: bool = False):
    model = get_peft_model(model, config).eval()
    return model.merge_and_unload() if merged else model


def hf_cases() -> dict[str, tuple[str, object, torch.Tensor]]:
    """name -> (baseline name, model, input)."""
    image = torch.randn(1, 3, 224, 224)
    video = torch.randn(12, 3, 224, 224)  # one video of 12 frames, contiguous
    tempme = TempMeConfig.from_preset("vit-b/32", lora_r=0)
    return {
        "ViT (unmerged)": (None, vit(), image),
        "ToMe r=16": ("ViT (unmerged)", peft(vit(), ToMeConfig(merge_schedule=16)), image),
        "PYRA low, unmerged LoRA": ("ViT (unmerged)", peft(vit(), PYRAConfig(merge_schedule="low")), image),
        "PYRA low, merged": ("ViT (unmerged)", peft(vit(), PYRAConfig(merge_schedule="low"), merged=True), image),
        "CLIP B/32 video, meanP (unmerged)": (None, clip_vision(), video),
        "TempMe B/32 video": ("CLIP B/32 video, meanP (unmerged)", peft(clip_vision(), tempme, merged=True), video),
    }


def reference_cases() -> dict[str, tuple[str, object, torch.Tensor]] | str:
    """The reference facebookresearch/ToMe on timm, or why it is skipped."""
    try:
        import timm
        import tome
    except ImportError as err:
        return f"skipped: {err} (pip install timm and facebookresearch/ToMe to compare)"
    image = torch.randn(1, 3, 224, 224)
    kwargs = dict(embed_dim=TINY["hidden_size"], depth=TINY["num_hidden_layers"], num_heads=TINY["num_attention_heads"],
                  mlp_ratio=TINY["intermediate_size"] / TINY["hidden_size"])
    torch.manual_seed(0)
    plain = timm.create_model("vit_base_patch16_224", pretrained=False, **kwargs).eval()
    torch.manual_seed(0)
    merged = timm.create_model("vit_base_patch16_224", pretrained=False, **kwargs).eval()
    tome.patch.timm(merged)
    merged.r = 16
    return {"timm ViT (unmerged)": (None, plain, image), "reference ToMe on timm r=16": ("timm ViT (unmerged)", merged,
                                                                                       image)}


def host_cost(args) -> dict:
    """The tiny-width host-cost table (ops and ms per forward, added vs the unmerged model)."""
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ToMe r=16 is clamped to 10 in the last layer (197 tokens), as the reference
        cases = hf_cases()
    reference = reference_cases()
    note = reference if isinstance(reference, str) else None
    if not isinstance(reference, str):
        cases.update(reference)
    seconds = interleaved_medians({name: forward(model, x) for name, (_, model, x) in cases.items()}, args.repeats)
    rows = {}
    for name, (base, model, x) in cases.items():
        rows[name] = {"ops": count_ops(model, x), "host_ms": round(1e3 * seconds[name], 3)}
        if base is not None:
            rows[name]["added_ops"] = rows[name]["ops"] - rows[base]["ops"]
            rows[name]["added_ms"] = round(rows[name]["host_ms"] - rows[base]["host_ms"], 3)
        print(f"{name:36s} {rows[name]}", flush=True)
    tome_ops, tome_ms = rows["ToMe r=16"]["added_ops"], rows["ToMe r=16"]["added_ms"]
    for name in ("PYRA low, unmerged LoRA", "PYRA low, merged"):
        rows[name]["added_ops_vs_tome"] = round(rows[name]["added_ops"] / tome_ops, 2)
        rows[name]["added_ms_vs_tome"] = round(rows[name]["added_ms"] / tome_ms, 2) if tome_ms > 0 else None
    return {"repeats": args.repeats, "load_avg_1min": os.getloadavg()[0], "reference": note or "measured",
            "rows": rows}


def vit_b16_speed(args) -> dict:
    """ViT-B/16 (random weights, 224 px): eager and compiled (`compile_for_inference`, inductor) images/s of the
    unmerged model, ToMe r=16 and merged PYRA low; speed-ups against the unmerged model in the same mode."""
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    torch.manual_seed(0)
    base = ViTModel(ViTConfig(patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                              intermediate_size=3072, image_size=224), add_pooling_layer=False).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models = {
            "unmerged": base,
            "ToMe r=16": peft(copy.deepcopy(base), ToMeConfig(merge_schedule=16), merged=True),
            "PYRA low": peft(copy.deepcopy(base), PYRAConfig(merge_schedule="low", init_weights=False), merged=True),
        }
    x = torch.randn(args.batch, 3, 224, 224)
    compile_s = {}
    compiled = {}
    for name, model in models.items():
        start = time.perf_counter()
        compiled[name] = compile_for_inference(model, example_inputs={"pixel_values": x})  # compiles and checks
        compile_s[name] = round(time.perf_counter() - start, 1)
        print(f"compiled {name} in {compile_s[name]} s", flush=True)
    timers = {**{f"eager {k}": forward(m, x) for k, m in models.items()},
              **{f"compiled {k}": forward(m, x) for k, m in compiled.items()}}
    seconds = interleaved_medians(timers, args.repeats, warmup=1)
    result = {"batch": args.batch, "threads": args.threads, "repeats": args.repeats,
              "load_avg_1min_before_after": [load_before, os.getloadavg()[0]],
              "images_per_s": {k: round(args.batch / s, 2) for k, s in seconds.items()}, "compile_s": compile_s}
    for mode in ("eager", "compiled"):
        result[f"{mode}_speedup_vs_unmerged"] = {
            k: round(seconds[f"{mode} unmerged"] / seconds[f"{mode} {k}"], 3) for k in models if k != "unmerged"}
    result["compiled_vs_eager"] = {k: round(seconds[f"eager {k}"] / seconds[f"compiled {k}"], 3) for k in models}
    print(result, flush=True)
    return result


def paired(args) -> dict:
    """`host_cost` of another checkout (`--compare-with`, e.g. the code before a change) and of this one, in
    alternating subprocesses (--rounds each), so that machine drift hits both; medians over the rounds."""
    runs = {"other": [], "this": []}
    for _ in range(args.rounds):
        for side, path in (("other", args.compare_with), ("this", str(Path(__file__).resolve().parents[1]))):
            env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
            out = subprocess.run([sys.executable, __file__, "--print", "--repeats", str(args.repeats)], env=env,
                                 capture_output=True, text=True, check=True)
            runs[side].append(json.loads(out.stdout.strip().splitlines()[-1])["rows"])
    result = {"compare_with": args.compare_with, "rounds": args.rounds, "load_avg_1min": os.getloadavg()[0]}
    for side, rows in runs.items():
        names = rows[0]
        ms = {n: statistics.median(r[n]["host_ms"] for r in rows) for n in names}
        result[side] = {n: {"ops": rows[0][n]["ops"], "host_ms": round(ms[n], 3),
                            **({"added_ops": rows[0][n]["added_ops"],
                                "added_ms": round(statistics.median(r[n]["added_ms"] for r in rows), 3)}
                               if "added_ops" in rows[0][n] else {})} for n in names}
    print(json.dumps(result, indent=1), flush=True)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--label", default="after", help="key under which this run is stored (e.g. before / after)")
    parser.add_argument("--compare-with", help="another checkout (e.g. of the code before a change): host cost of "
                                               "both, in alternating subprocesses")
    parser.add_argument("--rounds", type=int, default=3, help="--compare-with only")
    parser.add_argument("--print", action="store_true", help=argparse.SUPPRESS)  # a --compare-with subprocess
    parser.add_argument("--vit-b16", action="store_true",
                        help="instead: eager vs compiled speed-ups of ToMe and PYRA at ViT-B/16 size (stored under "
                             "'vit_b16/<label>')")
    parser.add_argument("--threads", type=int, default=2, help="--vit-b16 only")
    parser.add_argument("--batch", type=int, default=8, help="--vit-b16 only")
    args = parser.parse_args()
    if args.print:
        print(json.dumps(host_cost(args)))
        return
    old = json.loads(RESULT.read_text()) if RESULT.exists() else {}
    payload = {"runs": old.get("runs", {}), "vit_b16": old.get("vit_b16", {})}
    if args.vit_b16:
        payload["vit_b16"][args.label] = vit_b16_speed(args)
    elif args.compare_with:
        payload["runs"][args.label] = paired(args)
    else:
        payload["runs"][args.label] = host_cost(args)
    write_result("merging_ops", payload)


if __name__ == "__main__":
    main()
