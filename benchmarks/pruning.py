"""Structured pruning benchmarks (issues 8 and 17): speed and accuracy side by side.

speed:    a ResNet-50-shaped HF model (random weights) slimmed to <= 0.50 FLOPs in several ways — the official ResRep
          internal widths (resrep.md §c, 0.455), uniform internal-only widths, uniform widths over all groups
          (residual streams included; `widths_for_flops(..., groups="all", round_to=16)`) and Torch-Pruning's
          uniform L1 pruner at the same FLOPs — in NCHW and channels_last: FLOPs ratio (torch FlopCounterMode,
          224x224) and CPU latency (batch 8, 2 threads, interleaved medians in one process) against the dense model in
          the same layout -> results/pruning_speed.json
alignment: the measurement behind `round_to="auto"` on CPU: the same ResNet-50 at <= 0.50 FLOPs with uniform widths
          rounded to 1, 4, 8 and 16 (all groups and internal only), NCHW and channels_last, one interleaved loop
          -> results/pruning_alignment.json
accuracy: the testbed tiny ResNet (source domain), >= 3 seeds: ResRep and C-SGD with internal-only and all groups at
          0.7 and 0.5 FLOPs, and L1-magnitude pruning + fine-tuning (same groups, FLOPs, steps and schedule), mean and
          std over seeds -> results/pruning_accuracy.json (+ .png). Every finished run is cached in
          results/pruning_runs/ and reused, so an interrupted sweep resumes where it stopped.

    python benchmarks/pruning.py speed [--repeats 9]                      # needs: pip install torch-pruning (bench)
    python benchmarks/pruning.py alignment [--repeats 9] [--threads 2]
    nice -n 10 python benchmarks/pruning.py accuracy [--seeds 0 1 2] [--steps 600] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from transformers import ResNetConfig, ResNetForImageClassification

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peft_effadapt.pruning import (  # noqa: E402
    FlopsModel,
    ResRepCallback,
    apply_plan,
    count_flops,
    find_channel_groups,
    plan_from_widths,
    resrep_param_groups,
    select_groups,
    widths_for_flops,
)
from peft_effadapt.pruning import round_to as round_to_multiple  # noqa: E402

from common import RESULTS, inference, interleaved_medians, top1, write_result  # noqa: E402

# Final internal widths of the official ResRep ResNet-50 log (res50_54.5pruned_log.txt), per bottleneck (conv0, conv1).
LASSO, COMPACTOR_MOMENTUM = 5e-2, 0.9  # ResRep settings of the short accuracy runs (see resrep_row)
RESREP_RESNET50_WIDTHS = [
    [(22, 22), (23, 36), (1, 1)],
    [(62, 97), (16, 49), (38, 68), (41, 92)],
    [(189, 204), (69, 145), (65, 139), (64, 94), (67, 89), (86, 95)],
    [(473, 488), (171, 281), (511, 512)],
]
RUNS = RESULTS / "pruning_runs"


def resrep_widths() -> dict[str, int]:
    return {f"stage{s}.layer{i}.conv{k}": w for s, stage in enumerate(RESREP_RESNET50_WIDTHS)
            for i, pair in enumerate(stage) for k, w in enumerate(pair)}


class _Logits(nn.Module):
    """HF classifier -> plain logits module (Torch-Pruning traces a tensor-to-tensor forward)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(pixel_values=x).logits


def torch_pruning_model(full, flops_target: float, one: dict, round_to: int = 16, ratio: float | None = None):
    """Torch-Pruning's uniform (non-global) L1 magnitude pruner on every prunable layer but the classifier, at the
    smallest pruning ratio whose measured FLOPs are <= `flops_target` of the dense model. The ratio is first
    estimated with our FLOPs model (every group kept at (1 - ratio)·size rounded to `round_to`), then raised in small
    steps until the pruned model's measured FLOPs fit (each try is one real Torch-Pruning run)."""
    import torch_pruning as tp

    base = count_flops(full, one)
    groups = find_channel_groups(full)
    flops = FlopsModel.measure(full, one, groups)
    prunable = [g for g in groups if g.prunable]

    def estimate(ratio):
        return flops.ratio({g.name: round_to_multiple(max(1, int(g.size * (1 - ratio))), round_to, g.size)
                            for g in prunable})

    lo, hi = 0.0, 0.95
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if estimate(mid) <= flops_target else (mid, hi)
    ratio, best = ratio or hi, None
    for _ in range(4):  # secant steps on FLOPs ~ (1 - ratio)^2, keeping the closest fit below the target
        model = copy.deepcopy(full)
        pruner = tp.pruner.MagnitudePruner(_Logits(model), one["pixel_values"],
                                           importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=ratio,
                                           ignored_layers=[model.classifier[-1]], round_to=round_to,
                                           global_pruning=False)
        pruner.step()
        measured = count_flops(model, one) / base
        print(f"torch-pruning ratio {ratio:.4f}: FLOPs {measured:.4f}", flush=True)
        if measured <= flops_target and (best is None or measured > best[1]):
            best = (model, measured, ratio)
        if best is not None and flops_target - best[1] < 0.01:
            break
        ratio = 1 - (1 - ratio) * (flops_target / measured) ** 0.5 + (0.003 if measured > flops_target else -0.003)
    if best is None:
        raise RuntimeError(f"Torch-Pruning did not reach {flops_target} FLOPs")
    return best


LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
BATCH = 8


def time_layouts(models: dict[str, nn.Module], rows: dict[str, dict], repeats: int, clock=time.perf_counter):
    """Every model in both memory layouts (NCHW, channels_last) timed in one interleaved loop (batch 8 at 224x224,
    inference mode); returns the medians `{"model/layout": s}` and one table row per model and layout with its speed-up
    over the dense model (`models["dense"]`) in the same layout and in NCHW."""
    batch = torch.randn(BATCH, 3, 224, 224)
    fns = {}
    for layout, fmt in LAYOUTS.items():
        x = batch.contiguous(memory_format=fmt)
        for name, model in models.items():
            fns[f"{name}/{layout}"] = inference(copy.deepcopy(model).to(memory_format=fmt), pixel_values=x)
    print(f"timing {len(fns)} models; {_uptime()}", flush=True)
    times = interleaved_medians(fns, repeats=repeats, warmup=2, clock=clock)
    table = []
    for layout in LAYOUTS:
        dense_same, dense_nchw = times[f"dense/{layout}"], times["dense/nchw"]
        for name in models:
            seconds = times[f"{name}/{layout}"]
            table.append({"model": name, "layout": layout, "flops_ratio": rows[name]["flops_ratio"],
                          "latency_s": seconds, "speedup_vs_dense_same_layout": dense_same / seconds,
                          "speedup_vs_dense_nchw": dense_nchw / seconds})
    return times, table


def slimmed_variants(full: nn.Module, one: dict, groups, variants: dict) -> tuple[dict, dict]:
    """`{"dense": full, name: slimmed copy}` for `variants` (`{name: (widths, round_to)}`, magnitude plans) and one
    row per model: measured FLOPs ratio (checked against `FlopsModel`), round_to, group families, parameters."""
    flops = FlopsModel.measure(full, one, groups)
    models = {"dense": full}
    rows = {"dense": {"flops_ratio": 1.0, "gflops_224": flops.baseline / 1e9,
                      "params_m": sum(p.numel() for p in full.parameters()) / 1e6}}
    for name, (widths, multiple) in variants.items():
        model = copy.deepcopy(full)
        plan = plan_from_widths(model, groups, widths, round_to=multiple)
        apply_plan(model, plan)
        measured = count_flops(model, one)
        assert measured == flops.flops(plan.widths)
        models[name] = model
        rows[name] = {"flops_ratio": measured / flops.baseline, "round_to": multiple,
                      "groups": sorted({"streams" if g.residual or g.meta.get("role") == "stem" else "internal"
                                        for g in select_groups(groups, "all") if g.name in plan.widths}),
                      "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                      "widths_multiple_of": _largest_common_multiple(plan.widths.values())}
    return models, rows


def _largest_common_multiple(widths) -> int:
    """The largest of 16, 8, 4, 2, 1 that divides every width."""
    return next(m for m in (16, 8, 4, 2, 1) if all(w % m == 0 for w in widths))


def resnet50() -> tuple[nn.Module, list, dict]:
    """The dense ResNet-50 (HF layout: stride in the 3x3 conv; ImageNet head; random weights, seed 0), its channel
    groups and a one-image example input at 224x224."""
    torch.manual_seed(0)
    full = ResNetForImageClassification(ResNetConfig(num_labels=1000)).eval()
    return full, find_channel_groups(full), {"pixel_values": torch.randn(1, 3, 224, 224)}


def alignment(repeats: int, threads: int, multiples=(1, 4, 8, 16), flops_ratio: float = 0.5,
              scopes=("all",), clock: str = "wall") -> dict:
    """The CPU measurement behind `round_to="auto"`: ResNet-50 slimmed to <= `flops_ratio` with uniform widths
    (`widths_for_flops`) rounded to each multiple, for each group scope, in NCHW and channels_last, timed in one
    interleaved loop against the dense model (`clock="cpu"`: process CPU time, for a loaded machine)."""
    torch.set_num_threads(threads)
    full, groups, one = resnet50()
    variants = {f"{scope}_round{m}": (widths_for_flops(full, one, flops_ratio, groups=scope, round_to=m), m)
                for scope in scopes for m in multiples}
    models, rows = slimmed_variants(full, one, groups, variants)
    uptime_before = _uptime()
    _, table = time_layouts(models, rows, repeats, time.process_time if clock == "cpu" else time.perf_counter)
    by = {(r["model"], r["layout"]): r for r in table}
    for r in table:
        if r["model"] != "dense":
            base = by[(r["model"].rsplit("_round", 1)[0] + f"_round{multiples[0]}", r["layout"])]
            r[f"speedup_vs_round{multiples[0]}_same_layout"] = base["latency_s"] / r["latency_s"]
    return {"task": f"ResNet-50 (HF layout, random weights) slimmed to <= {flops_ratio} FLOPs, uniform widths rounded "
                    f"to {list(multiples)}", "batch": BATCH, "image_size": 224, "threads": threads,
            "repeats": repeats, "clock": "process CPU time" if clock == "cpu" else "wall", "scopes": list(scopes),
            "uptime_before": uptime_before, "uptime_after": _uptime(), "models": rows, "table": table}


def speed(repeats: int, threads: int, tp_ratio: float | None = None) -> dict:
    torch.set_num_threads(threads)
    full, groups, one = resnet50()
    flops = FlopsModel.measure(full, one, groups)
    variants = {
        "resrep_official_internal": (resrep_widths(), None),
        "internal_round16": (widths_for_flops(full, one, 0.5, groups="internal", round_to=16), 16),
        "all_groups_round16": (widths_for_flops(full, one, 0.5, groups="all", round_to=16), 16),
    }
    slim, rows = slimmed_variants(full, one, groups, variants)
    try:
        import torch_pruning as tp

        model, ratio, tp_ratio = torch_pruning_model(full, rows["all_groups_round16"]["flops_ratio"], one,
                                                     ratio=tp_ratio)
        slim["torch_pruning_round16"] = model
        rows["torch_pruning_round16"] = {"flops_ratio": ratio, "round_to": 16, "pruning_ratio": tp_ratio,
                                         "torch_pruning": tp.__version__,
                                         "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
        if ratio < rows["all_groups_round16"]["flops_ratio"] - 0.01:  # ours at Torch-Pruning's FLOPs, too
            widths = widths_for_flops(full, one, ratio, groups="all", round_to=16)
            model = copy.deepcopy(full)
            apply_plan(model, plan_from_widths(model, groups, widths, round_to=16))
            slim["all_groups_round16_at_tp_flops"] = model
            rows["all_groups_round16_at_tp_flops"] = {"flops_ratio": count_flops(model, one) / flops.baseline,
                                                      "round_to": 16, "groups": ["internal", "streams"],
                                                      "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    except ImportError:
        warnings.warn("torch-pruning is not installed (pip install torch-pruning): its row is left out.", stacklevel=1)
    uptime_before = _uptime()
    times, table = time_layouts(slim, rows, repeats)
    tp_rows = {r["layout"]: r for r in table if r["model"] == "torch_pruning_round16"}
    for r in table:
        if r["model"].startswith("all_groups_round16") and r["layout"] in tp_rows:
            r["latency_vs_torch_pruning"] = r["latency_s"] / tp_rows[r["layout"]]["latency_s"]
    return {"task": "ResNet-50 (HF layout, random weights, 1000 classes) slimmed to <= 0.50 FLOPs", "batch": BATCH,
            "image_size": 224, "threads": threads, "repeats": repeats, "uptime_before": uptime_before,
            "uptime_after": _uptime(), "flops_convention": "FlopCounterMode (2 per MAC), 224x224",
            "models": rows, "table": table}


def _uptime() -> str:
    try:
        import subprocess

        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


# ------------------------------------------------------------------------------------------------- accuracy
def _data(n_train: int):
    from peft_effadapt.testing import load_tiny_resnet, make_domain_dataset
    from peft_effadapt.testing.processing import dataset_images

    _, processor = load_tiny_resnet()
    train = make_domain_dataset("source", "train", n_per_class=n_train)
    test = make_domain_dataset("source", "test")
    pixels = lambda ds: processor.to_pixel_values(dataset_images(ds))  # noqa: E731
    return (pixels(train), torch.tensor(train["label"])), (pixels(test), torch.tensor(test["label"]))


def _train(model, train, steps, lr, optimizer, batch=64, seed=0, callback=None):
    """Plain loop that drives the callback exactly as the Trainer would (pre-optimizer-step, step-end)."""
    import types

    gen = torch.Generator().manual_seed(seed)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    state = types.SimpleNamespace(max_steps=steps, num_train_epochs=1, global_step=0, stateful_callbacks={})
    if callback is not None:
        callback.on_train_begin(types.SimpleNamespace(fsdp=None, deepspeed=None), state, None, optimizer=optimizer)
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(train[1]), (batch,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(pixel_values=train[0][idx]).logits, train[1][idx])
        optimizer.zero_grad()
        loss.backward()
        if callback is not None:
            callback.on_pre_optimizer_step(None, state, None, optimizer=optimizer)
        optimizer.step()
        schedule.step()
        state.global_step = step + 1
        if callback is not None:
            callback.on_step_end(None, state, None)
    model.eval()


def resrep_row(train, test, target: float, steps: int, seed: int = 0, scope: str = "internal") -> dict:
    from peft_effadapt.testing import load_tiny_resnet

    model, _ = load_tiny_resnet()
    # Short-schedule settings (the paper's lambda = 1e-4 with compactor momentum 0.99 needs ~1e4 steps per row, and
    # with a larger lambda momentum 0.99 overshoots zero and oscillates with a large amplitude): lambda 0.05 and
    # compactor momentum 0.9, masks complete early and frozen after 30 % of the steps, cosine lr to 0.
    cb = ResRepCallback(flops_target=target, groups=scope, lasso_strength=LASSO, mask_interval=5,
                        warmup_steps=steps // 20, begin_granularity=32, freeze_masks_after=0.3, drop_masked_rows=True)
    cb.prepare(model, {"pixel_values": test[0][:32]})
    optimizer = torch.optim.SGD(resrep_param_groups(model, lr=0.02, compactor_momentum=COMPACTOR_MOMENTUM),
                                lr=0.02, momentum=0.9)
    start = time.perf_counter()
    _train(model, train, steps, 0.02, optimizer, seed=seed, callback=cb)
    masked = torch.cat([c.row_norms()[c.mask == 0] for c in cb.compactors.values()])
    before_conversion = top1(model, test)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = cb.slim()
    return {"method": "ResRep", "scope": scope, "seed": seed, "flops_ratio": cb.final_flops_ratio,
            "accuracy": top1(model, test), "lasso_strength": LASSO, "compactor_momentum": COMPACTOR_MOMENTUM,
            "accuracy_before_conversion": before_conversion, "masked_flops_ratio": cb.masked_flops_ratio,
            "target_reached_step": cb.target_reached_step,
            "max_masked_row_norm": float(masked.max()) if masked.numel() else 0.0,
            "conversion_max_abs_error": cb.conversion_error, "widths": plan.widths,
            "train_seconds": time.perf_counter() - start}


def l1_row(train, test, flops_ratio: float, steps: int, seed: int = 0, scope: str = "internal") -> dict:
    """Magnitude (L1 of each filter, summed over a group's producers) pruning of the same groups with one keep ratio
    for all, the largest within `flops_ratio`, then fine-tuning with the same steps and schedule (SGD)."""
    from peft_effadapt.testing import load_tiny_resnet

    model, _ = load_tiny_resnet()
    groups = find_channel_groups(model)
    x = {"pixel_values": test[0][:32]}
    widths = widths_for_flops(model, x, flops_ratio, groups=scope)
    plan = plan_from_widths(model, groups, widths, method="l1")
    apply_plan(model, plan)
    pruned = top1(model, test)
    optimizer = torch.optim.SGD(resrep_param_groups(model, lr=0.02), lr=0.02, momentum=0.9)
    start = time.perf_counter()
    _train(model, train, steps, 0.02, optimizer, seed=seed)
    return {"method": "L1 + fine-tune", "scope": scope, "seed": seed,
            "flops_ratio": FlopsModel.measure(load_tiny_resnet()[0], x, groups).ratio(plan.widths),
            "accuracy": top1(model, test), "accuracy_before_finetune": pruned,
            "train_seconds": time.perf_counter() - start}


def csgd_row(train, test, flops_ratio: float, steps: int, seed: int = 0, scope: str = "internal") -> dict:
    """C-SGD on the same groups, FLOPs, steps and cosine schedule (lr 0.02, SGD Nesterov) through the Trainer."""
    from pruning_csgd import run_csgd

    try:
        row = run_csgd(train, test, flops_ratio, steps, seed, lr=0.02, centripetal_strength=3.0, scope=scope,
                       schedule="cosine")
    except RuntimeError as err:  # the slimming check refuses a lossy result when clusters did not converge
        return {"method": "C-SGD", "scope": scope, "seed": seed, "flops_ratio": flops_ratio, "accuracy": None,
                "error": str(err)[:300]}
    row.update(method="C-SGD", scope=scope, seed=seed)
    row.pop("deviation_history", None)
    return row


METHODS = {"ResRep": resrep_row, "C-SGD": csgd_row, "L1 + fine-tune": l1_row}


def accuracy(targets: list[float], scopes: list[str], seeds: list[int], steps: int, n_train: int,
             threads: int, cached_only: bool = False) -> dict:
    """Every (target, scope, method, seed) run, each cached as results/pruning_runs/<key>.json and reused
    (`cached_only`: summarise the finished runs without starting new ones)."""
    from peft_effadapt.testing import load_tiny_resnet

    torch.set_num_threads(threads)
    train, test = _data(n_train)
    base, _ = load_tiny_resnet()
    RUNS.mkdir(parents=True, exist_ok=True)
    runs = []
    for target in targets:  # seeds innermost: an interrupted sweep leaves complete mean/std cells
        for scope in scopes:
            for method, fn in METHODS.items():
                for seed in seeds:
                    key = f"{method.split()[0].lower()}-{scope}-{target}-seed{seed}-steps{steps}-n{n_train}"
                    path = RUNS / f"{key}.json"
                    if path.is_file():
                        row = json.loads(path.read_text())
                    elif cached_only:
                        continue
                    else:
                        torch.manual_seed(seed)
                        row = {**fn(train, test, target, steps, seed, scope), "target": target}
                        path.write_text(json.dumps(row, indent=1) + "\n")
                    runs.append(row)
                    print(key, row.get("flops_ratio"), row.get("accuracy"), flush=True)
    summary = []
    for target in targets:
        for scope in scopes:
            for method in METHODS:
                rows = [r for r in runs if r["method"] == method and r["scope"] == scope and r["target"] == target]
                accs = [r["accuracy"] for r in rows if r["accuracy"] is not None]
                if not rows:
                    continue
                summary.append({"method": method, "scope": scope, "target": target, "seeds": len(accs),
                                "failed": len(rows) - len(accs),
                                "flops_ratio_mean": statistics.mean(r["flops_ratio"] for r in rows),
                                "accuracy_mean": statistics.mean(accs) if accs else None,
                                "accuracy_std": statistics.stdev(accs) if len(accs) > 1 else None})
    unpruned = top1(base, test)
    try:
        from plots import errorbar_plot

        series: dict[str, list[tuple[float, float, float | None]]] = {}
        for row in summary:
            if row["accuracy_mean"] is not None:
                series.setdefault(f"{row['method']} ({row['scope']})", []).append(
                    (row["flops_ratio_mean"], 100 * row["accuracy_mean"],
                     None if row["accuracy_std"] is None else 100 * row["accuracy_std"]))
        for points in series.values():
            points.append((1.0, 100 * unpruned, None))
        errorbar_plot(RESULTS / "pruning_accuracy.png", series, "remaining FLOPs fraction",
                      "source test accuracy (%, mean ± sd over seeds)", "tiny ResNet: accuracy vs FLOPs")
    except ImportError:  # matplotlib is the optional `bench` extra
        pass
    return {"task": "testbed tiny ResNet, source domain (8 shapes); internal-only vs all groups (residual streams "
                    "and stem included)", "unpruned_accuracy": unpruned, "steps": steps, "batch": 64, "lr": 0.02,
            "schedule": "cosine", "n_train_per_class": n_train, "threads": threads, "seeds": seeds,
            "summary": summary, "runs": runs}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["speed", "alignment", "accuracy", "all"])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=None, help="default: 2 for speed, 1 for accuracy")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.7])
    parser.add_argument("--scopes", nargs="+", default=["internal", "all"], choices=["internal", "streams", "all"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--n-train", type=int, default=128, help="training images per class")
    parser.add_argument("--tp-ratio", type=float, default=None, help="first Torch-Pruning ratio to try")
    parser.add_argument("--cached-only", action="store_true", help="summarise finished runs, start none")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="alignment: wall time, or process CPU time (less disturbed on a loaded machine)")
    parser.add_argument("--scopes-alignment", nargs="+", default=["all"], choices=["internal", "streams", "all"])
    parser.add_argument("--out-name", default=None, help="alignment: result name (default pruning_alignment)")
    args = parser.parse_args()
    if args.what in ("speed", "all"):
        write_result("pruning_speed", speed(args.repeats, args.threads or 2, args.tp_ratio))
    if args.what == "alignment":
        write_result(args.out_name or "pruning_alignment", alignment(args.repeats, args.threads or 2,
                                                                     scopes=args.scopes_alignment, clock=args.clock))
    if args.what in ("accuracy", "all"):
        write_result("pruning_accuracy", accuracy(args.targets, args.scopes, args.seeds, args.steps, args.n_train,
                                                  args.threads or 1, args.cached_only))


if __name__ == "__main__":
    main()
