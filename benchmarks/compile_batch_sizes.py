"""What a new batch size costs a compiled model: `compile_for_inference` with static shapes (dynamic=False, the
default) against dynamo's automatic dynamic shapes (dynamic=None) and a symbolic batch from the start (dynamic=True).

A ToMe ViT (4 layers, width 64, 64 px, patch 8 -> 65 tokens, r=8) is called with batch sizes 2, 3, 4, 5, 3 through
inductor on the CPU: the wall time of each call (compilation included), the graphs compiled, and the steady-state
time of a batch-3 forward (median of --repeats). Writes benchmarks/results/compile_batch_sizes.json.

    python benchmarks/compile_batch_sizes.py [--threads 1] [--repeats 30]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch._inductor.config
from peft import get_peft_model
from torch._dynamo.utils import counters
from transformers import ViTConfig, ViTModel

from peft_effadapt import ToMeConfig, compile_for_inference

from common import write_result

SIZES = (2, 3, 4, 5, 3)


def tome_vit():
    torch.manual_seed(0)
    config = ViTConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                       image_size=64, patch_size=8)
    return get_peft_model(ViTModel(config, add_pooling_layer=False), ToMeConfig(merge_schedule=8))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch._inductor.config.fx_graph_cache = False  # time real compilations, not cache hits of an earlier run
    rows = {}
    for dynamic in (False, None, True):
        torch._dynamo.reset()
        counters.clear()
        compiled = compile_for_inference(tome_vit(), dynamic=dynamic)
        first_calls = []
        for batch in SIZES:
            x = torch.randn(batch, 3, 64, 64)
            start = time.perf_counter()
            with torch.no_grad():
                compiled(pixel_values=x)
            first_calls.append(round(time.perf_counter() - start, 2))
        x = torch.randn(3, 3, 64, 64)
        times = []
        with torch.no_grad():
            for _ in range(args.repeats):
                start = time.perf_counter()
                compiled(pixel_values=x)
                times.append(time.perf_counter() - start)
        rows[str(dynamic)] = {"call_s_for_batch_sizes": dict(zip([f"{i}: {b}" for i, b in enumerate(SIZES)],
                                                                   first_calls)),
                              "graphs": counters["stats"]["unique_graphs"],
                              "steady_batch3_ms": round(1e3 * statistics.median(times), 3)}
        print(dynamic, rows[str(dynamic)], flush=True)
    static = rows["False"]["steady_batch3_ms"]
    for row in rows.values():
        row["steady_vs_static"] = round(row["steady_batch3_ms"] / static, 3)
    write_result("compile_batch_sizes", {"sizes": SIZES, "load_avg_1min": os.getloadavg()[0], "rows": rows})


if __name__ == "__main__":
    main()
