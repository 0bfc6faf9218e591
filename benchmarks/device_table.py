"""The README's GPU table from a device-check JSON: one row per efficient model, one column per mode and batch, each
cell its speed-up over the unmodified model in the same mode and batch (measured in one interleaved loop).

    python benchmarks/device_table.py benchmarks/results/device_nvidia_h100_80gb_hbm3.json >> table.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

LABELS = {  # (case, model) -> what the row says; the reference is named in the case's row group
    ("token_merging", "tome"): "ToMe r=16 vs ViT-B/16",
    ("token_merging", "pyra_low_merged"): "PYRA low, merged, vs ViT-B/16",
    ("token_merging", "pyra_low"): "PYRA low, LoRA unmerged, vs ViT-B/16",
    ("pruning", "slimmed_aligned"): "ResNet-50 slimmed (all groups, aligned widths) vs dense, channels_last",
    ("pruning", "resrep_internal"): "ResNet-50 at the official ResRep widths (internal) vs dense, channels_last",
    ("tempme", "tempme"): "TempMe vs meanP (CLIP B/32, videos/s)",
    ("consolidator", "consolidator_merged"): "Consolidator merged vs ViT-B/16",
    ("consolidator", "consolidator_unmerged"): "Consolidator unmerged vs ViT-B/16",
    ("prompts", "coop"): "CoOp vs CLIP B/16 (images + 100 class prompts)",
    ("prompts", "rlp"): "RLP vs CLIP B/16",
    ("prompts", "qprompt-rlp_merged"): "QPrompt-RLP merged vs CLIP B/16",
    ("prompts", "qprompt-coop"): "QPrompt-CoOp vs CLIP B/16",
    ("prompts", "qprompt-maple"): "QPrompt-MaPLe vs CLIP B/16",
}
ORDER = ("eager", "reduce-overhead", "default")


def label(case: str, model: str, payload: dict) -> str:
    """The row's words; a slimmed model also gets its FLOPs ratio (from the section settings)."""
    text = LABELS.get((case, model), f"{case}: {model}")
    for entry in payload["sections"].values():
        ratio = (entry.get("settings") or {}).get("flops_ratio", {}).get(model) if case == "pruning" else None
        if ratio is not None:
            return f"{text} ({ratio:.3f} FLOPs)"
    return text


def cells(payload: dict) -> tuple[dict, list[tuple[str, int]]]:
    """`{(case, model): {(mode, batch): text}}` and the (mode, batch) columns in the order they ran."""
    rows: dict[tuple[str, str], dict[tuple[str, int], str]] = {}
    columns: list[tuple[str, int]] = []
    for name, entry in payload["sections"].items():
        parts = name.split("/")
        if parts[0] != "speed" or len(parts) < 4:
            continue
        case, mode, batch = parts[1], parts[2], int(parts[3].removeprefix("b"))
        if (mode, batch) not in columns:
            columns.append((mode, batch))
        results = entry.get("results", {})
        for model, result in results.items():
            if model == entry.get("reference"):
                continue
            rows.setdefault((case, model), {})[(mode, batch)] = _text(result)
        if "skipped" in entry or "error" in entry:
            for key in [k for k in rows if k[0] == case] or [(case, "all models")]:
                rows.setdefault(key, {}).setdefault((mode, batch), "skipped" if "skipped" in entry else "error")
    columns.sort(key=lambda c: (ORDER.index(c[0]) if c[0] in ORDER else len(ORDER), c[1]))
    return rows, columns


def _text(result: dict) -> str:
    if "speedup" in result:
        return f"{result['speedup']:.2f}x"
    return "skipped" if "skipped" in result else "-"


def device_line(payload: dict) -> str:
    device = payload.get("cuda_device") or payload.get("device_name") or payload.get("device")
    v = payload.get("versions", {})
    return (f"Measured on **{device}** (torch {v.get('torch')}, CUDA {v.get('cuda')}, transformers "
            f"{v.get('transformers')}, peft {v.get('peft')}; {payload.get('speed_dtype', 'bf16')} weights and inputs, "
            f"random weights; one run of {payload.get('elapsed_s')} s: `{payload.get('command')}`).")


def markdown(payload: dict) -> str:
    """The table (markdown) with a line naming the device, versions and command above it."""
    rows, columns = cells(payload)
    header = ["case (vs the unmodified model, same mode)"] + [f"{mode} b{batch}" for mode, batch in columns]
    lines = [device_line(payload), "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (case, model), by_column in rows.items():
        lines.append("| " + " | ".join([label(case, model, payload)] + [by_column.get(c, "-") for c in columns]) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("result", type=Path, help="a device-check JSON (benchmarks/results/device_<gpu>.json)")
    args = parser.parse_args(argv)
    print(markdown(json.loads(args.result.read_text())), end="")


if __name__ == "__main__":
    main()
