"""torch.compile over the conformance cases (tests/method_cases.py): one helper for tests/test_compile.py and
benchmarks/compile_graph_breaks.py, so the committed table of graphs and graph breaks is what the tests assert.

Graphs are counted by a backend that wraps the real one (inductor, or dynamo's "eager" for a quick count: dynamo
splits the graphs before any backend sees them, so both count the same); graph breaks and their reasons come from
dynamo's own counters.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from peft import get_peft_model
from torch._dynamo.utils import counters

MODES = ("inference", "training", "merged")
# One case per PEFT type, the smallest model of each: the cases tests/test_compile.py runs through inductor.
PER_TYPE = ("consolidator-clip-vision", "coop-clip", "cocoop-clip", "rlp-clip", "qprompt-coop-clip", "maple-clip",
            "tome-vit-cls", "pyra-vit-cls", "tempme-clip")


@dataclass
class CountingBackend:
    """A torch.compile backend that counts the graphs it is given and compiles them with `backend`."""

    backend: str = "inductor"
    graphs: int = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs += 1
        if self.backend == "inductor":
            from torch._inductor.compile_fx import compile_fx

            return compile_fx(gm, example_inputs)
        return gm.forward  # "eager": run the captured graph as is


@dataclass
class Compiled:
    """One compiled call: its output(s), its graphs and breaks (with reasons) and the wall time of the first call,
    compilation included."""

    value: object
    graphs: int
    graph_breaks: int
    reasons: list[str] = field(default_factory=list)
    first_call_s: float = 0.0

    def counts(self) -> dict:
        return {"graphs": self.graphs, "graph_breaks": self.graph_breaks, "reasons": self.reasons}


def build(case, merged: bool = False):
    """The case's PEFT model with its visibly non-identity adapter (deterministic: two calls give equal models)."""
    torch.manual_seed(0)
    model = get_peft_model(case.make_model(), case.make_config(init_weights=False))
    return model.merge_and_unload() if merged else model


def compiled_call(fn: Callable, backend: str = "inductor") -> Compiled:
    """Runs `fn(compile)` once, where `compile(module)` is `torch.compile(module, backend=<counting backend>)`
    (fullgraph=False, the default), after a fresh dynamo state."""
    torch._dynamo.reset()
    counters.clear()
    counting = CountingBackend(backend)
    start = time.perf_counter()
    value = fn(lambda module: torch.compile(module, backend=counting))
    elapsed = time.perf_counter() - start
    breaks = counters["graph_break"]
    reasons = sorted({str(reason).splitlines()[0][:160] for reason in breaks})
    return Compiled(value, counting.graphs, sum(breaks.values()), reasons, elapsed)


def inference(case, model, compile_fn=None) -> torch.Tensor:
    """The compared output in eval mode without gradients (through `compile_fn(model)` if given)."""
    model.eval()
    fn = model if compile_fn is None else compile_fn(model)
    with torch.no_grad():
        return case.output(fn(**case.make_inputs()))


def training_step(case, model, compile_fn=None, steps: int = 2, lr: float = 0.1) -> dict:
    """`steps` SGD steps in train mode; returns the losses, the trainable gradients of the first step and the
    trainable parameters after the last step."""
    model.train()
    fn = model if compile_fn is None else compile_fn(model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD(params.values(), lr=lr)
    losses, grads = [], {}
    for step in range(steps):
        optimizer.zero_grad()
        loss = case.train_loss(case.output(fn(**case.make_inputs())))
        loss.backward()
        if step == 0:
            grads = {n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None}
        optimizer.step()
        losses.append(loss.detach())
    return {"losses": torch.stack(losses), "grads": grads,
            "params": {n: p.detach().clone() for n, p in params.items()}}


def run_mode(case, mode: str, backend: str = "inductor") -> tuple[object, Compiled]:
    """(eager result, compiled result) of `mode` in MODES for `case`, each on its own freshly built model."""
    merged = mode == "merged"
    step = training_step if mode == "training" else inference
    eager = step(case, build(case, merged))
    model = build(case, merged)
    return eager, compiled_call(lambda compile_fn: step(case, model, compile_fn), backend)


def count_graphs(case, mode: str) -> dict:
    """Graphs, breaks and reasons of `mode` as `run_mode` compiles it, counted without inductor (seconds)."""
    return run_mode(case, mode, backend="eager")[1].counts()


def max_abs_difference(eager, compiled) -> float:
    """Largest absolute difference over an output tensor or every tensor of a `training_step` result."""
    if torch.is_tensor(eager):
        return float((eager - compiled).abs().max())
    pairs = [(eager["losses"], compiled["losses"])]
    pairs += [(eager[k][n], compiled[k][n]) for k in ("grads", "params") for n in eager[k]]
    return max(float((a - b).abs().max()) for a, b in pairs)


# -- compile_for_inference: the deployed form of every type, two batch sizes ----------------------------------------
@dataclass
class InferenceCase:
    """A module as deployed (`make()`), its inputs at a batch size (`inputs(batch)`) and the compared tensor."""

    id: str
    make: Callable[[], torch.nn.Module]
    inputs: Callable[[int], dict]
    output: Callable[[object], torch.Tensor]
    batches: tuple[int, int] = (3, 2)


def _method_case(case_id: str):
    from method_cases import CASES

    return next(case for case in CASES if case.id == case_id)


def _peft(case_id: str, merged: bool = False):
    return lambda: build(_method_case(case_id), merged)


def _images(batch: int) -> dict:
    from peft_effadapt.testing import tiny_pixel_values

    return {"pixel_values": tiny_pixel_values(batch=batch)}


def _classifier(case_id: str):
    """A CLIPZeroShotClassifier over the case's prompt adapter (its three placeholder classes)."""

    def make():
        from peft_effadapt import CLIPZeroShotClassifier

        return CLIPZeroShotClassifier(build(_method_case(case_id)), class_token_ids=[[20], [21, 22], [23, 24, 25]],
                                      special_token_ids=(1, 2, 0))

    return make


TEMPME_FRAMES = 4


def _tempme_retrieval(merged: bool = False):
    from peft_effadapt import CLIPVideoRetrieval

    model = build(_method_case("tempme-clip"), merged)  # 4 frames per video, clips of 4 in layer 1
    return CLIPVideoRetrieval(model)


def _tempme_vision():
    from peft_effadapt import TempMeConfig
    from peft_effadapt.testing import tiny_clip_vision

    config = TempMeConfig(num_frames=TEMPME_FRAMES, imgme_r=2, clip_merge_layers=[1], clip_group_sizes=[4], lora_r=2,
                          init_weights=False)
    return get_peft_model(tiny_clip_vision(seed=0), config).merge_and_unload()


def _videos(batch: int) -> dict:
    from peft_effadapt.testing import tiny_pixel_values, tiny_text_inputs

    pixels = tiny_pixel_values(batch=batch * TEMPME_FRAMES).view(batch, TEMPME_FRAMES, 3, 32, 32)
    return {"pixel_values": pixels, **tiny_text_inputs(batch=batch)}


def _prompts_and_images(batch: int) -> dict:
    """The three placeholder prompts of tests/method_cases.py and `batch` images."""
    from method_cases import _prompt_inputs

    return {**_prompt_inputs(), **_images(batch)}


def _slimmed_resnet():
    """A ResNet slimmed by a ResRep plan, saved and loaded back with `load_slimmed` (what a user deploys)."""
    import tempfile

    from peft_effadapt.pruning import apply_plan, find_channel_groups, load_slimmed, plan_from_widths, save_slimmed
    from peft_effadapt.testing import tiny_resnet

    model = tiny_resnet(random_batchnorm=True)
    plan = plan_from_widths(model, find_channel_groups(model), {"stage0.layer0.conv0": 2, "stage1": 16},
                            method="resrep")
    with tempfile.TemporaryDirectory() as folder:
        save_slimmed(apply_plan(model, plan), plan, folder)
        return load_slimmed(folder)


def _logits(out):
    return out.logits


INFERENCE_CASES = [
    InferenceCase("tome", _peft("tome-vit-cls"), _images, _logits),
    InferenceCase("pyra", _peft("pyra-vit-cls"), _images, _logits),
    InferenceCase("pyra-merged", _peft("pyra-vit-cls", merged=True), _images, _logits),
    InferenceCase("tempme-retrieval", _tempme_retrieval, _videos, lambda out: out.logits_per_text),
    InferenceCase("tempme-merged-video-encoder", lambda: _tempme_retrieval(merged=True).video_encoder(),
                  lambda batch: {"pixel_values": _videos(batch)["pixel_values"]}, lambda out: out),
    InferenceCase("tempme-merged-clip-vision", _tempme_vision, lambda batch: {"pixel_values": _videos(batch)[
        "pixel_values"]}, lambda out: out.pooler_output),  # the video hooks sit on the compiled module itself
    InferenceCase("slimmed-resnet", _slimmed_resnet, _images, _logits),
    InferenceCase("consolidator-merged", _peft("consolidator-vit-cls", merged=True), _images, _logits),
    *[InferenceCase(f"{case_id}-classifier", _classifier(f"{case_id}-clip"), _images, _logits)
      for case_id in ("coop", "rlp", "qprompt-coop", "qprompt-rlp", "qprompt-maple", "cocoop", "maple")],
    InferenceCase("qprompt-maple-peft", _peft("qprompt-maple-clip"), lambda batch: _prompts_and_images(batch),
                  lambda out: out.logits_per_image),
]


def compile_inference_case(case: InferenceCase, backend: str = "inductor", **kwargs) -> dict:
    """Eager outputs of the deployed form and `compile_for_inference` outputs at batch sizes a, a, b, b; the graphs
    compiled (one per batch size when nothing recompiles) and the graph breaks."""
    from peft_effadapt.compiling import compile_for_inference, inference_form

    torch.manual_seed(0)
    model = case.make()
    a, b = case.batches
    inputs = {n: case.inputs(n) for n in (a, b)}
    form = inference_form(model)
    with torch.no_grad():
        eager = {n: case.output(form(**x)) for n, x in inputs.items()}
    torch._dynamo.reset()
    counters.clear()
    counting = CountingBackend(backend)
    compiled = compile_for_inference(model, backend=counting, **kwargs)
    with torch.no_grad():
        got = {n: [case.output(compiled(**inputs[n])) for _ in range(2)] for n in (a, b)}
    return {"eager": eager, "compiled": got, "graphs": counting.graphs,
            "graph_breaks": sum(counters["graph_break"].values()), "model": model, "form": form}


# -- the same at real sizes (random weights; capture checked with dynamo's eager backend in the slow suite) ---------
def _vit_b16():
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    return ViTModel(ViTConfig(), add_pooling_layer=False).eval()  # ViT-B/16 at 224: 197 tokens


def _real_peft(config_fn, merged: bool):
    def make():
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ToMe r=16 is clamped to 10 in the last layer, as the reference
            model = get_peft_model(_vit_b16(), config_fn())
        return model.merge_and_unload() if merged else model

    return make


def _tempme_b32():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from peft_effadapt import TempMeConfig

    torch.manual_seed(0)
    vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                              num_attention_heads=12, image_size=224, patch_size=32)).eval()
    return get_peft_model(vision, TempMeConfig.from_preset("vit-b/32")).merge_and_unload()


def _resnet50_half_flops():
    from transformers import ResNetConfig, ResNetForImageClassification

    from peft_effadapt.pruning import apply_plan, find_channel_groups, plan_from_widths, widths_for_flops

    torch.manual_seed(0)
    model = ResNetForImageClassification(ResNetConfig()).eval()  # ResNet-50
    x = torch.randn(1, 3, 224, 224)
    widths = widths_for_flops(model, x, 0.5, groups="internal")
    return apply_plan(model, plan_from_widths(model, find_channel_groups(model), widths, method="resrep"))


def _real_images(batch: int) -> dict:
    return {"pixel_values": torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch))}


def _real_videos(batch: int) -> dict:
    return {"pixel_values": torch.randn(batch, 12, 3, 224, 224, generator=torch.Generator().manual_seed(batch))}


def _tome_r16():
    from peft_effadapt import ToMeConfig

    return ToMeConfig(merge_schedule=16)


def _pyra_low():
    from peft_effadapt import PYRAConfig

    return PYRAConfig(merge_schedule="low")


REAL_SHAPED_CASES = [
    InferenceCase("tome-vit-b16", _real_peft(_tome_r16, merged=False), _real_images,
                  lambda out: out.last_hidden_state, batches=(2, 1)),
    InferenceCase("pyra-low-vit-b16-merged", _real_peft(_pyra_low, merged=True), _real_images,
                  lambda out: out.last_hidden_state, batches=(2, 1)),
    InferenceCase("tempme-b32-merged", _tempme_b32, _real_videos, lambda out: out.pooler_output, batches=(2, 1)),
    InferenceCase("resnet50-half-flops", _resnet50_half_flops, _real_images, _logits, batches=(2, 1)),
]
