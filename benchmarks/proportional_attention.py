"""Proportional attention (softmax(QKᵀ/√d + log s_j) V, a per-key bias) through each kernel, on the CPU: what
`peft_effadapt.merging.attention` chooses from.

Kernels: the eager math (matmul, add, softmax, matmul: transformers' "eager" attention, the reference), SDPA with the
bias as a float B×1×1×N mask, SDPA without bias (the floor: the plain model's kernel), and FlexAttention with a
`score_mod` adding the bias (compiled only: eager FlexAttention runs an unfused reference). Each eager and compiled
(inductor), at ViT-B/16 shape after a few ToMe merges (batch 8, 12 heads, head dim 64, 197 and 101 tokens),
interleaved medians in one run (benchmarks/common.py); ratios are against eager SDPA with the bias. Writes
benchmarks/results/proportional_attention.json.

    python benchmarks/proportional_attention.py [--threads 2] [--repeats 20]
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from common import interleaved_medians, speed_arguments, write_result

try:
    from torch.nn.attention.flex_attention import flex_attention
except ImportError:  # torch < 2.5
    flex_attention = None


def math_attention(q, k, v, bias, scale):
    weights = torch.matmul(q, k.transpose(-1, -2)) * scale + bias
    return torch.matmul(weights.softmax(dim=-1), v)


def sdpa(q, k, v, bias, scale):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


def sdpa_without_bias(q, k, v, bias, scale):
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


class AddKeyBias:
    def __init__(self, bias):
        self.bias = bias

    def __call__(self, score, b, h, q_idx, kv_idx):
        return score + self.bias[b, kv_idx]


def flex(q, k, v, bias, scale):
    return flex_attention(q, k, v, score_mod=AddKeyBias(bias[:, 0, 0]), scale=scale)


def call(fn, *args):
    return lambda: fn(*args)


def main():
    args = speed_arguments(__doc__, repeats=20).parse_args()
    torch.set_num_threads(args.threads)
    kernels = {"math": math_attention, "sdpa+bias": sdpa, "sdpa, no bias": sdpa_without_bias}
    compiled = {f"compiled {name}": torch.compile(fn, fullgraph=True, dynamic=False) for name, fn in kernels.items()}
    if flex_attention is not None:
        compiled["compiled flex"] = torch.compile(flex, fullgraph=True, dynamic=False)
    rows = {}
    for tokens in (197, 101):
        torch.manual_seed(0)
        q, k, v = (torch.randn(args.batch, 12, tokens, 64) for _ in range(3))
        bias = (torch.rand(args.batch, 1, 1, tokens) * 3 + 1).log()
        scale = 64**-0.5
        reference = math_attention(q, k, v, bias, scale)
        fns = {**kernels, **compiled}
        errors = {}
        for name, fn in fns.items():  # first call compiles
            errors[name] = float((fn(q, k, v, bias, scale) - reference).abs().max())
        with torch.no_grad():
            seconds = interleaved_medians({n: call(fn, q, k, v, bias, scale) for n, fn in fns.items()}, args.repeats)
        base = seconds["sdpa+bias"]
        rows[tokens] = {name: {"ms": round(1e3 * s, 3), "speed_vs_eager_sdpa_bias": round(base / s, 3),
                               "max_abs_diff_vs_math": errors[name]} for name, s in seconds.items()}
        print(tokens, {n: r["speed_vs_eager_sdpa_bias"] for n, r in rows[tokens].items()}, flush=True)
    write_result("proportional_attention", {"batch": args.batch, "heads": 12, "head_dim": 64,
                                            "load_avg_1min": os.getloadavg()[0], "tokens": rows})


if __name__ == "__main__":
    main()
