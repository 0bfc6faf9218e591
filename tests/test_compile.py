"""torch.compile (inductor, CPU, fullgraph=False) against eager for every PEFT type: the inference forward, two SGD
steps (forward, backward, update) and the merged model, plus the graphs and graph breaks of each, which must be
those of the committed table; and `compile_for_inference` (fullgraph, inductor) for every type as deployed (benchmarks/results/compile_graph_breaks.json, written by
benchmarks/compile_graph_breaks.py through the same helper, tests/compile_check.py).

Tolerance: tests/fp32.py. Inductor fuses and reorders fp32 reductions (matmul blocking, softmax and layer-norm sums),
which moves results by a few ulp of their scale, the same order as another attention kernel; a wrong row, mask or
gradient moves them by far more. Inductor compiles C++ on the first call of each graph, tens of seconds per case on
2 cores, so the module is marked slow (.ci/run runs it).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from compile_check import (
    INFERENCE_CASES,
    PER_TYPE,
    REAL_SHAPED_CASES,
    build,
    compile_inference_case,
    compiled_call,
    run_mode,
)
from fp32 import assert_fp32_close
from method_cases import CASES

pytestmark = pytest.mark.slow

TABLE = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "compile_graph_breaks.json"
BY_ID = {case.id: case for case in CASES}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def committed(case_id: str, mode: str) -> dict:
    row = json.loads(TABLE.read_text())["rows"][case_id][mode]
    return {k: row[k] for k in ("graphs", "graph_breaks", "reasons")}


def test_the_table_covers_every_type_and_mode():
    rows = json.loads(TABLE.read_text())["rows"]
    assert set(rows) == {case.id for case in CASES}
    for case in CASES:
        assert set(rows[case.id]) == {"inference", "training"} | ({"merged"} if case.mergeable else set())


@pytest.mark.parametrize("case_id", PER_TYPE)
def test_compiled_inference_equals_eager(case_id):
    case = BY_ID[case_id]
    expected, compiled = run_mode(case, "inference")
    assert_fp32_close(compiled.value, expected)
    assert compiled.counts() == committed(case_id, "inference")


@pytest.mark.parametrize("case_id", PER_TYPE)
def test_compiled_training_steps_equal_eager(case_id):
    """Same losses, same adapter gradients, same parameters after two SGD steps (the second step runs the compiled
    graph on the updated parameters)."""
    case = BY_ID[case_id]
    expected, compiled = run_mode(case, "training")
    got = compiled.value
    assert expected["grads"] and set(got["grads"]) == set(expected["grads"])
    assert_fp32_close(got["losses"], expected["losses"])
    for name, grad in expected["grads"].items():
        assert_fp32_close(got["grads"][name], grad, msg=name)
    for name, param in expected["params"].items():
        assert_fp32_close(got["params"][name], param, msg=name)
    assert compiled.counts() == committed(case_id, "training")


@pytest.mark.parametrize("case_id", [i for i in PER_TYPE if BY_ID[i].mergeable])
def test_compiled_merged_model_equals_eager(case_id):
    case = BY_ID[case_id]
    expected, compiled = run_mode(case, "merged")
    assert_fp32_close(compiled.value, expected)
    assert compiled.counts() == committed(case_id, "merged")


def test_compiled_token_merging_drops_an_empty_mask_and_refuses_a_real_one():
    """A materialised "no padding" mask (eager attention builds one from an all-ones attention_mask) compiles without
    a break and is dropped; a real padding mask through the same graph fails with the eager error's message."""
    case = BY_ID["tome-vit-cls"]
    model = build(case).eval()
    model.config._attn_implementation = "eager"  # sdpa would skip a mask that masks nothing before it reaches us
    x = case.make_inputs()["pixel_values"]
    tokens = model.base_model.planned_token_counts()[0]
    with torch.no_grad():
        expected = model(pixel_values=x).logits
    padding = torch.ones(x.shape[0], tokens)
    padding[:, -3:] = 0

    def calls(compile_fn):
        fn = compile_fn(model)
        with torch.no_grad():
            out = fn(pixel_values=x, attention_mask=torch.ones(x.shape[0], tokens)).logits
            with pytest.raises(RuntimeError, match="cannot use an attention/padding mask"):
                fn(pixel_values=x, attention_mask=padding)
        return out

    compiled = compiled_call(calls)
    assert_fp32_close(compiled.value, expected)
    assert (compiled.graphs, compiled.graph_breaks) == (1, 0)


@pytest.mark.parametrize("case", INFERENCE_CASES, ids=lambda case: case.id)
def test_compile_for_inference_with_inductor_equals_eager(case):
    """The deployed form of every type through inductor: one graph per batch size, none on a repeat, equal to
    eager (tests/test_compile_inference.py checks the capture in seconds with dynamo's eager backend)."""
    result = compile_inference_case(case)
    assert (result["graphs"], result["graph_breaks"]) == (2, 0)
    for batch, outputs in result["compiled"].items():
        for out in outputs:
            assert_fp32_close(out, result["eager"][batch])


@pytest.mark.parametrize("case", REAL_SHAPED_CASES, ids=lambda case: case.id)
def test_real_shaped_models_capture_in_one_graph_per_batch_size(case):
    """ViT-B/16 with ToMe r=16 and merged PYRA low, TempMe's ViT-B/32 video case (12 frames) and a ResNet-50 slimmed
    to half its FLOPs: one graph per batch size, no break, equal to eager (capture by dynamo, eager backend)."""
    result = compile_inference_case(case, backend="eager")
    assert (result["graphs"], result["graph_breaks"]) == (2, 0)
    for batch, outputs in result["compiled"].items():
        for out in outputs:
            assert_fp32_close(out, result["eager"][batch])


def test_flex_kernel_through_inductor_equals_the_eager_math():
    """FlexAttention with the per-key bias score_mod (opt-in: `use_key_bias_kernel("flex")`), compiled by inductor
    for the CPU, against the eager math. Standalone, with the bias as a graph input: inductor's CPU template of torch 2.13
    takes no bias computed inside the graph (a merging model's)."""
    from peft_effadapt.merging.attention import flex_key_bias_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 37, 16) for _ in range(3))
    bias = (torch.rand(2, 1, 1, 37) * 3 + 1).log()
    scale = 16**-0.5
    weights = (q @ k.transpose(-1, -2) * scale + bias).softmax(dim=-1)
    expected = (weights @ v).transpose(1, 2)
    compiled = torch.compile(flex_key_bias_attention, fullgraph=True)
    assert_fp32_close(compiled(q, k, v, bias, scale), expected)
