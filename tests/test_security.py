"""Security policy checks: no code path unpickles user-supplied files, nothing needs remote code, no eval/exec.

1. A static scan (AST) of the package, the examples and the benchmarks fails on `torch.load`, `pickle`/`dill`/`marshal` imports,
   `weights_only=False`, `allow_pickle=True`, `use_safetensors=False`, `trust_remote_code=True`, `yaml.load`,
   `eval(`/`exec(` and `shell=True`. An exception needs an entry in `ALLOWED` with the reason.
2. A folder whose only weights are a pickled `adapter_model.bin` that would run code when unpickled (it creates a
   marker file) is refused by every loading route, and the marker never appears.
"""

from __future__ import annotations

import ast
import copy
import pickle
import re
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model

from method_cases import CASES

ROOT = Path(__file__).resolve().parents[1]
SCANNED = [ROOT / "peft_effadapt", ROOT / "examples", ROOT / "benchmarks"]
# (path relative to the repo, finding) -> why it is safe. Empty: nothing needs an exception today.
ALLOWED: dict[tuple[str, str], str] = {}

UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "marshal", "shelve", "joblib", "cloudpickle"}
UNSAFE_KEYWORDS = {("weights_only", False), ("allow_pickle", True), ("use_safetensors", False),
                   ("trust_remote_code", True), ("shell", True)}


def _findings(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"import {n}" for n in names if n.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in ("eval", "exec", "__import__"):
                found.append(f"{func.id}(")
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and (func.value.id, func.attr) in {
                    ("torch", "load"), ("yaml", "load"), ("yaml", "unsafe_load"), ("numpy", "load"), ("np", "load")}:
                found.append(f"{func.value.id}.{func.attr}(")
            for keyword in node.keywords:
                if isinstance(keyword.value, ast.Constant) and (keyword.arg, keyword.value.value) in UNSAFE_KEYWORDS:
                    found.append(f"{keyword.arg}={keyword.value.value}")
    return found


_TEXT_PATTERNS = re.compile(r"torch\.load\(|\bimport (c?pickle|dill|marshal)|weights_only\s*=\s*False|"
                           r"trust_remote_code\s*=\s*True|allow_pickle\s*=\s*True|(?<![.\w])(eval|exec)\(")


def _scan(text: str, relative: str) -> list[str]:
    """AST findings; a file that does not parse (e.g. mid-edit) is scanned as text instead."""
    try:
        return _findings(ast.parse(text, filename=relative))
    except SyntaxError:
        return [match.group(0) for match in _TEXT_PATTERNS.finditer(text)]


def test_static_scan_finds_no_unsafe_loading_or_code_execution():
    scanned, violations = 0, []
    for folder in SCANNED:
        for path in sorted(folder.rglob("*.py")):
            relative = str(path.relative_to(ROOT))
            for finding in _scan(path.read_text(), relative):
                if (relative, finding) not in ALLOWED:
                    violations.append(f"{relative}: {finding}")
            scanned += 1
    assert scanned > 20, "the scan did not find the package sources"
    assert not violations, "unsafe calls (add an ALLOWED entry with a reason if one is truly safe):\n" + "\n".join(
        violations)


def test_text_fallback_catches_the_same_calls():
    assert _scan("def broken(:\n    torch.load(f, weights_only=False)\n    eval(x)\n", "x.py") == [
        "torch.load(", "weights_only=False", "eval("]


def test_scanner_catches_what_it_should():
    source = """
import pickle
from dill import loads
torch.load(f, weights_only=False)
AutoModel.from_pretrained(x, trust_remote_code=True)
eval(text)
exec(code)
subprocess.run(cmd, shell=True)
np.load(f, allow_pickle=True)
model.eval()
"""
    found = _findings(ast.parse(source))
    assert found.count("torch.load(") == 1 and "weights_only=False" in found and "trust_remote_code=True" in found
    assert {"import pickle", "import dill", "eval(", "exec(", "shell=True", "allow_pickle=True", "np.load("} <= set(
        found)
    assert len(found) == 10  # model.eval() is a method, not the builtin


class _Bomb:
    """Unpickling this creates `marker` (harmless stand-in for arbitrary code)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _first_case_per_type():
    chosen = {}
    for case in CASES:
        chosen.setdefault(case.make_config().peft_type.value, case)
    return list(chosen.values())


REPS = _first_case_per_type()


def _bomb_folder(case, tmp_path: Path, keep_safetensors: bool = False) -> tuple[Path, Path]:
    folder, marker = tmp_path / "adapter", tmp_path / "PWNED"
    get_peft_model(case.make_model(), case.make_config()).save_pretrained(folder)
    if not keep_safetensors:
        (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.bin").write_bytes(pickle.dumps({"weights": _Bomb(marker)}))
    return folder, marker


@pytest.mark.parametrize("case", REPS, ids=[case.id for case in REPS])
def test_pickled_adapter_is_refused_and_never_unpickled(case, tmp_path):
    folder, marker = _bomb_folder(case, tmp_path)
    model = case.make_model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="never unpickles"):
        PeftModel.from_pretrained(model, folder)
    with pytest.raises(ValueError, match="never unpickles"):
        type(case.make_config()).from_pretrained(folder)
    assert not marker.exists(), "the pickled adapter file was unpickled"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_transformers_load_adapter_route_refuses_the_pickle(tmp_path):
    case = next(c for c in REPS if hasattr(c.make_model(), "load_adapter"))
    folder, marker = _bomb_folder(case, tmp_path)
    model = case.make_model()
    with pytest.raises((ValueError, OSError), match="never unpickles|adapter_model.safetensors"):
        model.load_adapter(str(folder))  # transformers asks for the safetensors file itself
    assert not marker.exists()


def test_safetensors_wins_over_a_pickle_beside_it(tmp_path):
    case = REPS[0]
    folder, marker = _bomb_folder(case, tmp_path, keep_safetensors=True)
    PeftModel.from_pretrained(case.make_model(), folder)
    assert not marker.exists()


def test_the_bomb_is_real(tmp_path):
    """Guards the test above: unpickling the crafted file does create the marker."""
    marker = tmp_path / "PWNED"
    pickle.loads(pickle.dumps(_Bomb(marker))).close()
    assert marker.exists()
