"""The import rule of docs/architecture.md, checked on the package's import graph (every module parsed with `ast`;
imports inside functions and under TYPE_CHECKING count as well)."""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "peft_effadapt"
CORES = ("merging", "prompting", "quantization", "pruning", "active")
EDGES = ("tasks", "testing", "hub")
TUNER_IMPORTERS = ("registration",)  # besides the package root and the tuners package (rule 3)


def module_names(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package (packages under their own name)."""
    names = {}
    for path in package_dir.rglob("*.py"):
        parts = (package_dir.name, *path.relative_to(package_dir).with_suffix("").parts)
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def import_graph(package_dir: Path) -> set[tuple[str, str, tuple[str, ...]]]:
    """(importer, imported module, names taken) for every import of a module of the package by a module of it."""
    modules = module_names(package_dir)
    root = package_dir.name
    edges = set()
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [(alias.name, ()) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join([*base, node.module] if node.module else base)
                names = tuple(alias.name for alias in node.names)
                submodules = [(f"{target}.{n}", ()) for n in names if f"{target}.{n}" in modules]
                targets = [(target, names), *submodules]
            else:
                continue
            edges |= {(name, t, n) for t, n in targets if t == root or t.startswith(root + ".")}
    return edges


def layer_of(module: str) -> tuple[str, str]:
    """('root' | 'tuners' | 'tuner' | 'core' | 'edge' | 'base', the top-level unit: a tuner or core name...)."""
    parts = module.split(".")[1:]
    if not parts:
        return "root", ""
    if parts[0] == "tuners":
        return ("tuner", parts[1]) if len(parts) > 1 else ("tuners", "tuners")
    if parts[0] in CORES:
        return "core", parts[0]
    if parts[0] in EDGES:
        return "edge", parts[0]
    return "base", parts[0]


def method_folder(module: str, modules: dict[str, Path]) -> str | None:
    """For a module inside a sub-package of a core (pruning/csgd/...): that sub-package's name."""
    parts = module.split(".")
    if len(parts) < 3 or parts[1] not in CORES:
        return None
    sub = ".".join(parts[:3])
    return sub if sub in modules and modules[sub].name == "__init__.py" else None


def violations(package_dir: Path) -> list[str]:
    modules = module_names(package_dir)
    found = []
    for importer, imported, _ in sorted(import_graph(package_dir)):
        (src_layer, src_unit), (dst_layer, dst_unit) = layer_of(importer), layer_of(imported)
        arrow = f"{importer} imports {imported}"
        if dst_layer == "tuner" and src_unit != dst_unit:
            if src_layer == "tuner":
                found.append(f"{arrow}: a tuner never imports another tuner (rule 1)")
            elif src_layer == "core":
                found.append(f"{arrow}: a core never imports a tuner (rule 2)")
            elif src_layer not in ("root", "tuners") and src_unit not in TUNER_IMPORTERS:
                found.append(f"{arrow}: only the package __init__ and registration import tuners (rule 3)")
        if src_layer in ("core", "base") and dst_layer == "edge":
            found.append(f"{arrow}: cores and base modules never import an edge (rules 2, 5)")
        if src_layer == "base" and dst_layer == "core":
            found.append(f"{arrow}: base modules never import a core (rule 5)")
        if src_layer == "core" and dst_layer == "root":
            found.append(f"{arrow}: a core never imports the package root, which imports every tuner (rule 2)")
        src_method, dst_method = method_folder(importer, modules), method_folder(imported, modules)
        core_init = importer == ".".join(importer.split(".")[:2])  # e.g. peft_effadapt.pruning, its __init__
        if dst_method not in (None, src_method) and src_layer == "core" and src_unit == dst_unit and not core_init:
            found.append(f"{arrow}: a method folder is imported only by itself and its core's __init__ (rule 4)")
    return found


def import_cycles(package_dir: Path) -> list[list[str]]:
    """Every set of two or more modules that import each other, directly or round a circle (Tarjan's strongly
    connected components of the import graph; lazy imports count, as everywhere in this file)."""
    graph: dict[str, set[str]] = {}
    for importer, imported, _ in import_graph(package_dir):
        if importer != imported:
            graph.setdefault(importer, set()).add(imported)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = stack[stack.index(module):]
            del stack[stack.index(module):]
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return cycles


def test_the_package_follows_the_import_rule():
    assert violations(PACKAGE_DIR) == []


def test_no_modules_import_each_other():
    """Two modules never import each other (rule 6): a shared piece moves below both, e.g. pruning's `ChannelGroup`
    into `channel_group.py`, read by the rules (`groups.py`) and the tracer (`tracing.py`)."""
    assert import_cycles(PACKAGE_DIR) == []


def test_a_circle_of_imports_is_caught(tmp_path):
    package = _write(tmp_path / "pkg", {
        "__init__.py": "", "pruning/__init__.py": "", "pruning/groups.py": "from .tracing import trace\n",
        "pruning/tracing.py": "def trace():\n    from .groups import ChannelGroup\n",
        "tasks/__init__.py": "from ..testing import data\n", "testing/__init__.py": "",
        "testing/data.py": "from ..tasks import clip\n", "tasks/clip.py": "",
    })
    assert import_cycles(package) == [["pkg.pruning.groups", "pkg.pruning.tracing"],
                                      ["pkg.tasks", "pkg.testing.data"]]


def test_the_graph_sees_relative_absolute_and_lazy_imports():
    edges = {(a, b) for a, b, _ in import_graph(PACKAGE_DIR)}
    assert ("peft_effadapt.tuners.tome.model", "peft_effadapt.merging") in edges  # `from ...merging import`
    assert ("peft_effadapt.tuners.pyra.layer", "peft_effadapt.merging") in edges
    assert ("peft_effadapt", "peft_effadapt.tuners.tome") in edges
    assert not any(a.startswith("peft_effadapt.tuners.pyra") and b.startswith("peft_effadapt.tuners.tome")
                   for a, b in edges)


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, source in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    return root


@pytest.mark.parametrize(
    ("files", "rule"),
    [
        ({"tuners/b/model.py": "from ..a.layer import X\n"}, "rule 1"),
        ({"tuners/b/model.py": "def f():\n    import pkg.tuners.a.layer\n"}, "rule 1"),
        ({"merging/tuner.py": "from ..tuners.a import layer\n"}, "rule 2"),
        ({"merging/tuner.py": "from .. import ToMeConfig\n"}, "rule 2"),
        ({"merging/tuner.py": "from .. import __version__\n"}, "rule 2"),  # metadata too: from _version.py
        ({"merging/tuner.py": "from ..tasks import clip\n"}, "rules 2, 5"),
        ({"tasks/clip.py": "from ..tuners.a.layer import X\n"}, "rule 3"),
        ({"registration.py": "from .merging import tuner\n"}, "rule 5"),
        ({"pruning/csgd/__init__.py": "", "pruning/resrep/__init__.py": "from ..csgd import C\n"}, "rule 4"),
        ({"pruning/plan.py": "from .csgd import C\n", "pruning/csgd/__init__.py": ""}, "rule 4"),
    ],
)
def test_each_rule_catches_its_violation(tmp_path, files, rule):
    base = {"__init__.py": "from .tuners.a import layer\n", "tuners/__init__.py": "", "tuners/a/__init__.py": "",
            "tuners/a/layer.py": "from ...merging import tuner\n", "merging/__init__.py": "",
            "merging/tuner.py": "from .._version import __version__\n", "tasks/__init__.py": "", "tasks/clip.py": "",
            "registration.py": "", "_version.py": "", "pruning/__init__.py": "", "pruning/plan.py": ""}
    package = _write(tmp_path / "pkg", {**base, **files})
    found = violations(package)
    assert found and all(rule in line for line in found), found


def test_a_clean_package_passes(tmp_path):
    package = _write(tmp_path / "pkg", {
        "__init__.py": "from .tuners.a import AConfig\nfrom . import registration\n",
        "registration.py": "", "_version.py": "", "tuners/__init__.py": "",
        "tuners/a/__init__.py": "from .model import AConfig\n",
        "tuners/a/model.py": "from ...merging import base\nfrom ... import registration\nAConfig = 1\n",
        "merging/__init__.py": "", "merging/base.py": "from .._version import __version__\n",
        "pruning/__init__.py": "from .csgd import C\n", "pruning/plan.py": "", "pruning/csgd/__init__.py": "C = 1\n",
        "pruning/csgd/callback.py": "from ..plan import x\n", "tasks/__init__.py": "from ..merging import base\n",
    })
    assert violations(package) == []
