"""Structured pruning benchmarks (issue 8, item 6).

speed:    a ResNet-50-shaped HF model (random weights) slimmed to the official ResRep widths (resrep.md §c), with and
          without round_to=16: FLOPs ratio (torch FlopCounterMode, 224x224) and CPU latency ratio (batch 8, interleaved
          medians, 2 threads) -> results/pruning_speed.json
accuracy: the testbed ResNet (source domain) before pruning, after ResRep at ~50 % FLOPs, and L1-magnitude pruning +
          fine-tuning at the same FLOPs (same steps, same schedule); `csgd_row` is the hook for C-SGD's row
          -> results/pruning_accuracy.json and pruning_accuracy.png (accuracy vs FLOPs)

    python benchmarks/pruning.py speed [--repeats 7]
    python benchmarks/pruning.py accuracy [--targets 0.5 0.7] [--steps 300] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from transformers import ResNetConfig, ResNetForImageClassification

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peft_effadapt.pruning import (  # noqa: E402
    FlopsModel,
    ResRepCallback,
    apply_plan,
    build_resrep_param_groups,
    count_flops,
    find_channel_groups,
    plan_from_widths,
)

from common import RESULTS, interleaved_medians, write_result  # noqa: E402

# Final internal widths of the official ResRep ResNet-50 log (res50_54.5pruned_log.txt), per bottleneck (conv0, conv1).
LASSO, COMPACTOR_MOMENTUM = 5e-2, 0.9  # ResRep settings of the short accuracy runs (see resrep_row)
RESREP_RESNET50_WIDTHS = [
    [(22, 22), (23, 36), (1, 1)],
    [(62, 97), (16, 49), (38, 68), (41, 92)],
    [(189, 204), (69, 145), (65, 139), (64, 94), (67, 89), (86, 95)],
    [(473, 488), (171, 281), (511, 512)],
]


def resrep_widths() -> dict[str, int]:
    return {f"stage{s}.layer{i}.conv{k}": w for s, stage in enumerate(RESREP_RESNET50_WIDTHS)
            for i, pair in enumerate(stage) for k, w in enumerate(pair)}


def speed(repeats: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = ResNetConfig(num_labels=1000)  # ResNet-50 layout (stride in the 3x3 conv), ImageNet head
    full = ResNetForImageClassification(config).eval()
    groups = find_channel_groups(full)
    one = {"pixel_values": torch.randn(1, 3, 224, 224)}
    flops = FlopsModel.measure(full, one, groups)
    models, rows = {"full": full}, {}
    for name, multiple in (("resrep", None), ("resrep_round16", 16)):
        model = ResNetForImageClassification(config).eval()
        model.load_state_dict(full.state_dict())
        plan = plan_from_widths(model, groups, resrep_widths(), round_to=multiple)
        apply_plan(model, plan)
        models[name] = model
        measured = count_flops(model, one)
        assert measured == flops.flops(plan.widths)
        rows[name] = {"flops_ratio": measured / flops.baseline, "round_to": multiple,
                      "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    rows["full"] = {"flops_ratio": 1.0, "params_m": sum(p.numel() for p in full.parameters()) / 1e6,
                    "gflops_224": flops.baseline / 1e9}
    batch = torch.randn(8, 3, 224, 224)

    def runner(model):
        def run():
            with torch.inference_mode():
                model(pixel_values=batch)
        return run

    load_before = os.getloadavg()
    times = interleaved_medians({name: runner(m) for name, m in models.items()}, repeats=repeats, warmup=2)
    for name, seconds in times.items():
        rows[name]["latency_s"] = seconds
        rows[name]["speedup"] = times["full"] / seconds
    return {"task": "ResNet-50 (HF layout, random weights) slimmed to the official ResRep internal widths",
            "batch": 8, "image_size": 224, "threads": threads, "repeats": repeats,
            "load_average_1min": [load_before[0], os.getloadavg()[0]], "flops_convention":
            "FlopCounterMode (2 per MAC), 224x224, stride in the 3x3 conv", "rows": rows}


# ------------------------------------------------------------------------------------------------- accuracy
def _data(n_train: int):
    from peft_effadapt.testing import load_tiny_resnet, make_domain_dataset
    from peft_effadapt.testing.processing import dataset_images

    _, processor = load_tiny_resnet()
    train = make_domain_dataset("source", "train", n_per_class=n_train)
    test = make_domain_dataset("source", "test")
    pixels = lambda ds: processor.to_pixel_values(dataset_images(ds))  # noqa: E731
    return (pixels(train), torch.tensor(train["label"])), (pixels(test), torch.tensor(test["label"]))


def _accuracy(model, test) -> float:
    model.eval()
    with torch.no_grad():
        preds = torch.cat([model(pixel_values=test[0][i:i + 256]).logits.argmax(-1)
                           for i in range(0, len(test[1]), 256)])
    return float((preds == test[1]).float().mean())


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


def resrep_row(train, test, target: float, steps: int, seed: int = 0) -> dict:
    from peft_effadapt.testing import load_tiny_resnet

    model, _ = load_tiny_resnet()
    # Short-schedule settings (the paper's lambda = 1e-4 with compactor momentum 0.99 needs ~1e4 steps per row, and
    # with a larger lambda momentum 0.99 overshoots zero and oscillates with a large amplitude): lambda 0.05 and
    # compactor momentum 0.9, masks complete early and frozen after 30 % of the steps, cosine lr to 0.
    cb = ResRepCallback(flops_target=target, lasso_strength=LASSO, mask_interval=5, warmup_steps=steps // 20,
                        begin_granularity=32, freeze_masks_after=0.3, drop_masked_rows_on_convert=True)
    cb.prepare(model, {"pixel_values": test[0][:32]})
    optimizer = torch.optim.SGD(build_resrep_param_groups(model, lr=0.02, compactor_momentum=COMPACTOR_MOMENTUM),
                                lr=0.02, momentum=0.9)
    start = time.perf_counter()
    _train(model, train, steps, 0.02, optimizer, seed=seed, callback=cb)
    masked = torch.cat([c.row_norms()[c.mask == 0] for c in cb.compactors.values()])
    before_conversion = _accuracy(model, test)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = cb.convert()
    return {"method": "ResRep", "flops_ratio": cb.final_flops_ratio, "accuracy": _accuracy(model, test),
            "lasso_strength": LASSO, "compactor_momentum": COMPACTOR_MOMENTUM,
            "accuracy_before_conversion": before_conversion, "masked_flops_ratio": cb.masked_flops_ratio, "target_reached_step": cb.target_reached_step,
            "max_masked_row_norm": float(masked.max()) if masked.numel() else 0.0,
            "conversion_max_abs_error": cb.conversion_error, "widths": plan.widths,
            "train_seconds": time.perf_counter() - start}


def l1_row(train, test, flops_ratio: float, steps: int, seed: int = 0) -> dict:
    """Magnitude (L1 of each filter) pruning of the same internal layers with one keep ratio for all, chosen by
    bisection to match `flops_ratio`, then fine-tuning with the same steps and schedule (SGD, no compactors)."""
    from peft_effadapt.testing import load_tiny_resnet

    model, _ = load_tiny_resnet()
    groups = find_channel_groups(model)
    internal = [g for g in groups if g.internal and g.meta.get("role") == "block"]
    flops = FlopsModel.measure(model, {"pixel_values": test[0][:32]}, groups)

    def widths(ratio):
        return {g.name: max(1, round(ratio * g.size)) for g in internal}

    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if flops.ratio(widths(mid)) < flops_ratio else (lo, mid)
    plan = plan_from_widths(model, groups, widths(hi), method="l1")
    apply_plan(model, plan)
    pruned = _accuracy(model, test)
    optimizer = torch.optim.SGD(build_resrep_param_groups(model, lr=0.02), lr=0.02, momentum=0.9)
    start = time.perf_counter()
    _train(model, train, steps, 0.02, optimizer, seed=seed)
    return {"method": "L1 + fine-tune", "flops_ratio": flops.ratio(plan.widths), "accuracy": _accuracy(model, test),
            "accuracy_before_finetune": pruned, "keep_ratio": hi, "train_seconds": time.perf_counter() - start}


def csgd_row(train, test, flops_ratio: float, steps: int, seed: int = 0) -> dict | None:
    """Hook for C-SGD's row (the C-SGD benchmark adds it): same data, FLOPs ratio and step budget; return a dict with
    at least method, flops_ratio and accuracy, or None to leave the row out."""
    from pruning_csgd import run_csgd  # C-SGD on the same internal groups, cosine schedule, lr 0.02 (SGD, Nesterov)

    return run_csgd(train, test, flops_ratio, steps, seed, lr=0.02, centripetal_strength=3.0, scope="internal",
                    schedule="cosine")


def accuracy(targets: list[float], steps: int, n_train: int, threads: int) -> dict:
    from peft_effadapt.testing import load_tiny_resnet

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    train, test = _data(n_train)
    base, _ = load_tiny_resnet()
    rows = [{"method": "unpruned", "flops_ratio": 1.0, "accuracy": _accuracy(base, test)}]
    for target in targets:
        resrep = resrep_row(train, test, target, steps)
        rows.append(resrep)
        print(resrep, flush=True)
        rows.append(l1_row(train, test, resrep["flops_ratio"], steps))
        print(rows[-1], flush=True)
        try:
            extra = csgd_row(train, test, resrep["flops_ratio"], steps)
        except RuntimeError as err:  # e.g. C-SGD's trim refuses a lossy result when clusters did not converge
            extra = {"method": "C-SGD", "flops_ratio": resrep["flops_ratio"], "accuracy": None,
                     "error": str(err)[:300]}
        if extra is not None:
            rows.append(extra)
        print(rows[-3:], flush=True)
    return {"task": "testbed tiny ResNet, source domain (8 shapes); internal bottleneck convs pruned",
            "steps": steps, "batch": 64, "lr": 0.02, "n_train_per_class": n_train, "threads": threads, "rows": rows}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["speed", "accuracy", "all"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--n-train", type=int, default=128, help="training images per class")
    args = parser.parse_args()
    if args.what in ("speed", "all"):
        write_result("pruning_speed", speed(args.repeats, args.threads))
    if args.what in ("accuracy", "all"):
        result = accuracy(args.targets, args.steps, args.n_train, args.threads)
        write_result("pruning_accuracy", result)
        try:
            from plots import pruning_figure

            pruning_figure(result, RESULTS / "pruning_accuracy.png")
        except ImportError:
            print("matplotlib not installed (the `bench` extra): no plot")


if __name__ == "__main__":
    main()
