"""The compiled inference path of every PEFT type: one call that a GPU user makes before timing or serving.

Token merging, slimmed CNNs and merged adapters only pay off on a fast GPU when the forward is one compiled graph
replayed without per-op host cost (CUDA graphs, ``mode="reduce-overhead"``). `compile_for_inference` makes that
graph: eval mode, the deployed form of task wrappers, frozen quantised prompts, one graph (`fullgraph=True`), static
shapes. docs/guides/compile-gpu.md describes what compiles, the batch-size behaviour and the GPU mode.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable

import torch
from torch import nn

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# fp32: reordered sums (thousands of terms) over tens of layers move a real-size model's outputs by up to ~2e-5 of
# their scale (merged PYRA on ViT-B/16, inductor on the CPU: 1.1e-4 at scale 5.9); a wrong row, mask or merge moves
# them by far more. Half types: their own rounding step.
EQUALITY_RTOL = {torch.float64: 1e-4, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def inference_form(model: nn.Module) -> nn.Module:
    """What is compiled for `model`: its `inference_module()` where it has one (a task wrapper whose deployed form
    caches constants, e.g. `CLIPZeroShotClassifier`: the class text features), else `model` itself; in eval mode,
    with every quantised prompt frozen to its deployed values (modules with `freeze_for_inference`)."""
    model.eval()
    form = model.inference_module() if hasattr(model, "inference_module") else model
    form.eval()
    for module in form.modules():
        if hasattr(module, "freeze_for_inference"):
            module.freeze_for_inference()
    return form


def compile_for_inference(
    model: nn.Module,
    *,
    mode: str = "default",
    fullgraph: bool = True,
    dynamic: bool = False,
    backend: str | Callable = "inductor",
    example_inputs: dict | tuple | None = None,
):
    """Compiles `model` for inference: eval mode, one graph (`fullgraph=True`), static shapes (`dynamic=False`).

    Every PEFT type of this package compiles into one graph without a host synchronisation: ToMe, PYRA (merged or
    not), TempMe (also inside `CLIPVideoRetrieval`), slimmed CNNs (`load_slimmed`), merged Consolidator, and the
    prompt methods (a `CLIPZeroShotClassifier` is compiled in its deployed form, `classifier.inference_module()`:
    the class text features are computed now and are constants; QPrompt's quantised prompts are frozen).

    Batch sizes: with `dynamic=False` each new input shape compiles once (the first call with it is slow), a
    repeated shape never recompiles. Dynamo keeps up to `torch._dynamo.config.recompile_limit` (8) graphs per
    forward; a further new shape then raises under `fullgraph=True` instead of running eagerly: serve a few fixed
    batch sizes (pad the last batch), or pass `dynamic=None` to let dynamo make the batch size symbolic after the
    second shape (one more graph for all later sizes, at the price of a graph with symbolic shapes).

    Args:
        model: a PEFT model, a merged model, a slimmed model or a task wrapper.
        mode: a `torch.compile` mode; `"reduce-overhead"` (CUDA graphs) is the GPU mode; on the CPU it runs like
            `"default"` (CUDA graphs need CUDA tensors).
        fullgraph: fail on a graph break instead of running part of the forward eagerly.
        dynamic: False compiles one graph per input shape (each new batch size compiles once).
        backend: a `torch.compile` backend; `mode` applies to "inductor" only (tests use "eager" to check capture
            in seconds).
        example_inputs: keyword arguments (a dict) or positional arguments (a tuple) of one representative call:
            compiles now (the first request is not slow) and checks the compiled output against eager, sample by
            sample, within the rounding of the output dtype (`EQUALITY_RTOL`: 1e-4 relative and of the output
            scale in fp32; see `check_against_eager`).

    Returns:
        The compiled module (call it like `model`; like `model.inference_module()` for a task wrapper).

    Raises:
        ValueError: `mode` is not a `torch.compile` mode.
        RuntimeError: with `example_inputs`, every sample of the compiled output differs from eager beyond the
            tolerance (a RuntimeWarning when only some do).
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile_for_inference: mode={mode!r} is not one of {COMPILE_MODES}")
    form = inference_form(model)
    options = {"mode": mode} if backend == "inductor" else {}
    with _hooks_inside_the_graph():
        compiled = torch.compile(form, fullgraph=fullgraph, dynamic=dynamic, backend=backend, **options)
    if example_inputs is not None:
        check_against_eager(form, compiled, example_inputs)
    return compiled


def _hooks_inside_the_graph():
    """`torch.compile(module)` runs the hooks of the module itself outside the graph (each compiled as a frame of its
    own) unless dynamo's `wrap_top_frame` is set when the module is wrapped: set it, so that e.g. TempMe's video
    hooks on a bare `CLIPVisionModel` are part of the one graph. Older torch without the option: unchanged."""
    if hasattr(torch._dynamo.config, "wrap_top_frame"):
        return torch._dynamo.config.patch(wrap_top_frame=True)
    return contextlib.nullcontext()


def _call(module, inputs):
    with torch.no_grad():
        return module(**inputs) if isinstance(inputs, dict) else module(*inputs)


def _main_tensor(output) -> torch.Tensor:
    """The first tensor of an output (a tensor, a ModelOutput or a tuple)."""
    if torch.is_tensor(output):
        return output
    values = output.values() if isinstance(output, dict) else output
    return next(v for v in values if torch.is_tensor(v))


def check_against_eager(form: nn.Module, compiled, inputs) -> None:
    """Runs `inputs` through `compiled` (compiling it now) and `form` eagerly and compares the first output tensors,
    row by row (dim 0, the batch), within `EQUALITY_RTOL` of their dtype (relative, plus that fraction of the eager
    output's largest magnitude as absolute tolerance: the rule of tests/fp32.py).

    Raises RuntimeError when the shapes differ or every row differs (a defect moves them all). Warns when only some
    rows differ: token merging decides which tokens merge by ranking similarity scores, and two scores closer than
    their fp32 rounding (seen at ViT-B/16 size with random weights: PYRA's rank-dependent modulation, a gap of 3.6e-6)
    can swap under another summation order, which changes that sample's output legitimately."""
    expected, got = _main_tensor(_call(form, inputs)), _main_tensor(_call(compiled, inputs))
    name = type(form).__name__
    if got.shape != expected.shape:
        raise RuntimeError(f"compile_for_inference: the compiled {name} returns shape {tuple(got.shape)}, eager "
                           f"{tuple(expected.shape)}.")
    if not expected.numel():
        return
    rtol = EQUALITY_RTOL.get(expected.dtype, 1e-5)
    expected, got = expected.detach().float(), got.detach().float()
    allowed = rtol * expected.abs() + rtol * max(1.0, float(expected.abs().max()))
    bad_rows = ((got - expected).abs() > allowed).reshape(expected.shape[0], -1).any(dim=1)
    if not bad_rows.any():
        return
    message = (f"compile_for_inference: the compiled {name} differs from eager in {int(bad_rows.sum())} of "
               f"{bad_rows.numel()} rows (max |difference| {float((got - expected).abs().max()):.3g}, allowed "
               f"{rtol:g} relative and of the output scale for {expected.dtype}).")
    if bad_rows.all():
        raise RuntimeError(message)
    warnings.warn(message + " Only some samples differ: with token merging, near-equal similarity scores can rank "
                  "differently under another summation order, which changes those samples legitimately.",
                  RuntimeWarning, stacklevel=3)
