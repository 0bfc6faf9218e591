"""Traced channel groups (issue 21, item 3): per family (HF ConvNeXt-T, RegNetY-4GF-shaped default RegNet,
MobileNetV2 1.0, random weights) the groups found (prunable / refused) and the CPU speed of the model slimmed to
<= 0.5 FLOPs (`widths_for_flops(..., groups="all", round_to=8)`, L1 magnitude plan) against the dense model: one
process, 1 thread, batch 1, interleaved medians -> results/pruning_traced.json (with the load average).

    nice -n 10 python benchmarks/pruning_traced.py [--repeats 15] [--size 160]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peft_effadapt.pruning import (  # noqa: E402
    apply_plan,
    count_flops,
    find_channel_groups,
    plan_from_widths,
    widths_for_flops,
)

from common import interleaved_medians, write_result  # noqa: E402


def families():
    from transformers import (
        ConvNextConfig,
        ConvNextForImageClassification,
        MobileNetV2Config,
        MobileNetV2ForImageClassification,
        RegNetConfig,
        RegNetForImageClassification,
    )

    return {"ConvNeXt": lambda: ConvNextForImageClassification(ConvNextConfig()),
            "RegNet": lambda: RegNetForImageClassification(RegNetConfig()),
            "MobileNetV2": lambda: MobileNetV2ForImageClassification(MobileNetV2Config())}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--size", type=int, default=160)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(1, 3, args.size, args.size)
    rows = {}
    for name, make in families().items():
        dense = make().eval()
        groups = find_channel_groups(dense, x)
        widths = widths_for_flops(dense, x, 0.5, groups="all", round_to=8)
        slim = apply_plan(copy.deepcopy(dense), plan_from_widths(dense, groups, widths, round_to=8, method="l1"))
        ratio = count_flops(slim, x) / count_flops(dense, x)
        load_before = os.getloadavg()[0]
        with torch.no_grad():
            times = interleaved_medians({"dense": lambda m=dense: m(x), "slim": lambda m=slim: m(x)}, args.repeats)
        rows[name] = {"groups": len(groups), "prunable": sum(g.prunable for g in groups),
                      "refused": sum(not g.prunable for g in groups), "flops_ratio": round(ratio, 4),
                      "dense_ms": round(1e3 * times["dense"], 2), "slim_ms": round(1e3 * times["slim"], 2),
                      "speedup": round(times["dense"] / times["slim"], 3),
                      "load_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
        print(name, rows[name], flush=True)
    write_result("pruning_traced", {"size": args.size, "batch": 1, "threads": 1, "repeats": args.repeats,
                                    "families": rows})


if __name__ == "__main__":
    main()
