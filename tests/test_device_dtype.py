"""Device and dtype hygiene of every PEFT type, on CPU (see also benchmarks/device_check.py for a real device).

* device: no tensor factory in peft_effadapt runs without an explicit device during a forward (on a GPU it would
  create a CPU tensor); checked by intercepting the factories while the model runs,
* dtype: a float64 model fed float64 inputs produces no op output of another float dtype (a leaked float32),
* `.to(dtype)` / `.half()` / `.bfloat16()` move every adapter tensor; a bf16 model runs and matches fp32,
* `low_cpu_mem_usage=True` (adapters created on the meta device, then assigned) loads to the same outputs,
* merging keeps the base weights' dtype; bf16 and fp16 models load fp32 adapters, and fp32 models bf16 adapters.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from method_cases import CASES

PACKAGE = str(Path(__file__).resolve().parents[1] / "peft_effadapt")
TESTING = PACKAGE + "/testing"
FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.eye, torch.rand, torch.randn,
             torch.randint, torch.linspace, torch.tensor, torch.as_tensor}
IDS = [c.id for c in CASES]


def _peft(case, **kw):
    torch.manual_seed(0)
    return get_peft_model(case.make_model(), case.make_config(init_weights=False, **kw)).eval()


def _cast(inputs: dict, dtype) -> dict:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


class FactoryWatch(TorchFunctionMode):
    """Records tensor factories called directly from peft_effadapt code without `device=` (and, for float results,
    without `dtype=`): on a GPU those create CPU / float32 tensors."""

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES:
            caller = inspect.currentframe().f_back
            if caller is not None and caller.f_code.co_filename.startswith(PACKAGE) and not \
                    caller.f_code.co_filename.startswith(TESTING):  # test inputs are made before they are moved
                where = f"{Path(caller.f_code.co_filename).name}:{caller.f_lineno} {func.__name__}"
                if "device" not in kwargs and func not in (torch.tensor, torch.as_tensor):
                    self.found.append(f"{where} without device=")
                if func in (torch.tensor, torch.as_tensor) and "device" not in kwargs and not (
                        args and isinstance(args[0], torch.Tensor)):
                    self.found.append(f"{where} without device=")
        return func(*args, **kwargs)


class FloatDtypeWatch(TorchDispatchMode):
    """Records ops whose floating outputs are not `dtype`."""

    def __init__(self, dtype):
        super().__init__()
        self.dtype, self.found = dtype, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != self.dtype:
                self.found.add(f"{func} -> {t.dtype}")
        return out


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_creates_tensors_on_the_input_device(case):
    model = _peft(case)
    model.train()  # training paths (dropout, quantiser fits, ...) included
    watch = FactoryWatch()
    with watch:
        case.output(model(**case.make_inputs())).float().pow(2).mean().backward()
    model.eval()
    with watch, torch.no_grad():
        model(**case.make_inputs())
    assert not watch.found, sorted(set(watch.found))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_float64_model_computes_in_float64(case):
    model = _peft(case).double()
    inputs = _cast(case.make_inputs(), torch.float64)
    watch = FloatDtypeWatch(torch.float64)
    with watch, torch.no_grad():
        out = case.output(model(**inputs))
    assert out.dtype == torch.float64
    if case.id.startswith("qprompt"):  # by design: the codebook is stored in fp16 and fitted (K-means) in fp32;
        assert watch.found <= {f"aten.{op}.default -> {d}" for op in ("_to_copy", "detach", "view", "clone",
                               "index", "sort", "sub", "div", "mul", "add", "abs", "mean", "std", "lift_fresh")
                               for d in ("torch.float16", "torch.float32")}, sorted(watch.found)
        return  # its output values still reach float64 (checked above)
    assert not watch.found, sorted(watch.found)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("how", ["to", "half", "bfloat16"])
def test_dtype_moves_every_adapter_tensor(case, how):
    model = _peft(case)
    dtype = torch.float16 if how == "half" else torch.bfloat16
    moved = model.to(dtype) if how == "to" else getattr(model, how)()
    wrong = [n for n, t in [*moved.named_parameters(), *moved.named_buffers()]
             if t.is_floating_point() and t.dtype != dtype]
    assert not wrong, wrong


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bfloat16_model_runs_and_matches_float32(case):
    model = _peft(case)
    with torch.no_grad():
        ref = case.output(model(**case.make_inputs()))
        out = case.output(model.bfloat16()(**_cast(case.make_inputs(), torch.bfloat16)))
    assert out.dtype == torch.bfloat16
    assert _rel(out, ref) < 5e-2  # bf16: 8 mantissa bits (2^-8 = 0.4 % per rounding) through 2 small layers


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_low_cpu_mem_usage_load(case, tmp_path):
    model = _peft(case)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        ref = case.output(model(**case.make_inputs()))
        loaded = PeftModel.from_pretrained(case.make_model(), tmp_path, low_cpu_mem_usage=True).eval()
        out = case.output(loaded(**case.make_inputs()))  # QPrompt decodes its stored form lazily, at first use
        assert not [n for n, p in loaded.named_parameters() if p.is_meta]
        assert not [n for n, b in loaded.named_buffers() if b.is_meta]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("case", [c for c in CASES if c.mergeable], ids=[c.id for c in CASES if c.mergeable])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_merge_keeps_base_dtype(case, dtype):
    torch.manual_seed(0)
    base = case.make_model().to(dtype)
    model = get_peft_model(base, case.make_config(init_weights=False)).eval()
    before = {n: p.dtype for n, p in case.make_model().to(dtype).named_parameters()}
    inputs = _cast(case.make_inputs(), dtype)
    with torch.no_grad():
        unmerged = case.output(model(**inputs)) if dtype == torch.bfloat16 else None
        merged_model = model.merge_and_unload()
        after = {n: p.dtype for n, p in merged_model.named_parameters()}
        assert {n: d for n, d in after.items() if d != dtype} == {}, "merge changed the base dtype"
        assert set(after) <= set(before) | {n for n in after if "modules_to_save" in n}
        if unmerged is not None:
            assert _rel(case.output(merged_model(**inputs)), unmerged) < 5e-2


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("saved, loaded", [(torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                                           (torch.bfloat16, torch.float32)], ids=["fp32->bf16", "fp32->fp16",
                                                                                 "bf16->fp32"])
def test_adapter_loads_across_dtypes(case, saved, loaded, tmp_path):
    model = _peft(case)
    with torch.no_grad():
        ref = case.output(model(**case.make_inputs()))
    (model.to(saved) if saved != torch.float32 else model).save_pretrained(tmp_path)
    base = case.make_model().to(loaded)
    other = PeftModel.from_pretrained(base, tmp_path).eval()
    compute = torch.bfloat16 if loaded == torch.float16 else loaded  # fp16 on CPU: check dtypes, compute in bf16
    if loaded == torch.float16:
        assert all(p.dtype in (torch.float16, torch.float32) for p in other.parameters())
        other = other.to(compute)
    with torch.no_grad():
        out = case.output(other(**_cast(case.make_inputs(), compute)))
    assert out.dtype == compute
    assert _rel(out, ref) < 5e-2  # one bf16/fp16 rounding of the weights (and bf16 compute) vs fp32
