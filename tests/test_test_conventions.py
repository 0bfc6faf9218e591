"""The suite's own conventions, checked on its source with `ast`: tests that cannot fail stay out.

1. Every test function checks something: an ``assert``, ``pytest.raises``/``warns``/``fail``, a call of an
   ``assert*`` function (``torch.testing.assert_close``, ``assert_fp32_close``, ...), ``subprocess.run(check=True)``,
   or a call of a helper of the tests (same module or an imported tests/ module) that does one of these.
2. No check compares an expression with itself (``assert x == x``, ``assert_close(a, a)``): operands that are the
   same call expression are allowed, since two calls can differ (a determinism check).
3. ``pytest.importorskip`` only for modules that ``pip install .[test,docs]`` installs (the dependencies and the
   extras .ci/run installs) or the standard library: anything else would be skipped in every CI run.
"""

from __future__ import annotations

import ast
import importlib.metadata
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
PYPROJECT = TESTS.parent / "pyproject.toml"
CHECK_CONTEXTS = {"raises", "warns", "deprecated_call"}
COMPARISONS = {"equal", "allclose", "isclose", "array_equal"}
# stdlib from Python 3.11 on (requires-python allows 3.10, where its importorskip is a Python-version skip)
STDLIB = set(sys.stdlib_module_names) | {"tomllib"}
CI_EXTRAS = ("test", "docs")  # what .ci/run installs beside the dependencies (`pip install -e ".[test,docs]"`)
# Violations that a branch not yet merged removes (none at present). The test below fails once one is gone, so that
# this list is emptied at merge time instead of going stale.
PENDING: set[str] = set()


def call_name(node: ast.AST) -> str:
    """'pytest.raises' for pytest.raises(...), 'assert_close' for torch.testing.assert_close(...), '' otherwise."""
    func = node.func if isinstance(node, ast.Call) else node
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        base = call_name(func.value)
        return f"{base}.{func.attr}" if base == "pytest" else func.attr
    return ""


class Module:
    """One tests/ module: its functions and the tests/ modules it imports names from."""

    def __init__(self, path: Path):
        self.path = path
        self.tree = ast.parse(path.read_text(encoding="utf-8"))
        self.functions: dict[str, ast.FunctionDef] = {}
        self.imported: dict[str, tuple[str, str]] = {}  # local name -> (tests module, name there)
        for node in ast.walk(self.tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self.functions.setdefault(node.name, node)
            elif isinstance(node, ast.ImportFrom) and node.module and (path.parent / f"{node.module}.py").exists():
                for alias in node.names:
                    self.imported[alias.asname or alias.name] = (node.module, alias.name)

    def tests(self):
        """What pytest collects: module-level ``test*`` functions and ``test*`` methods of ``Test*`` classes."""
        for node in self.tree.body:
            members = node.body if isinstance(node, ast.ClassDef) and node.name.startswith("Test") else [node]
            for member in members:
                if isinstance(member, (ast.FunctionDef, ast.AsyncFunctionDef)) and member.name.startswith("test"):
                    yield member


class Suite:
    def __init__(self, folder: Path):
        self.modules = {path.stem: Module(path) for path in sorted(folder.glob("*.py"))}
        self._checks: dict[tuple[str, str], bool] = {}

    def function_checks(self, module: str, name: str) -> bool:
        key = (module, name)
        if key not in self._checks:
            self._checks[key] = False  # recursion guard
            source = self.modules.get(module)
            if source is not None and name in source.imported:
                self._checks[key] = self.function_checks(*source.imported[name])
            elif source is not None and name in source.functions:
                self._checks[key] = self.body_checks(module, source.functions[name])
        return self._checks[key]

    def body_checks(self, module: str, function: ast.AST) -> bool:
        for node in ast.walk(function):
            if isinstance(node, ast.Assert):
                return True
            if isinstance(node, ast.withitem) and call_name(node.context_expr).removeprefix("pytest.") in CHECK_CONTEXTS:
                return True
            if not isinstance(node, ast.Call):
                continue
            name = call_name(node)
            if name == "pytest.fail" or name.startswith(("assert", "_assert")) or name in ("pytest.raises",
                                                                                        "pytest.warns"):
                return True
            if name == "run" and any(k.arg == "check" and getattr(k.value, "value", None) is True
                                     for k in node.keywords):
                return True
            if isinstance(node.func, ast.Name) and self.function_checks(module, node.func.id):
                return True
        return False


def self_comparisons(tree: ast.AST) -> list[ast.AST]:
    """Asserts and comparison calls whose two operands are the same expression without a call in it."""
    def same(a: ast.AST, b: ast.AST) -> bool:
        return ast.dump(a) == ast.dump(b) and not any(isinstance(n, ast.Call) for n in ast.walk(a))

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(same(x, y) for x, y in zip(operands, operands[1:])):
                found.append(node)
        elif isinstance(node, ast.Call) and len(node.args) >= 2:
            name = call_name(node)
            if (name.startswith("assert") or name in COMPARISONS) and same(node.args[0], node.args[1]):
                found.append(node)
    return found


def installed_by_test_extra() -> set[str]:
    """Top-level module names provided by the distributions of [project].dependencies + the extras CI installs."""
    import tomllib  # noqa: I001 - Python >= 3.11, where this check runs

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads(PYPROJECT.read_text())["project"]
    wanted = {canonicalize_name(Requirement(r).name)
              for r in [*project["dependencies"], *(r for extra in CI_EXTRAS for r in project["optional-dependencies"][extra])]}
    installed = {module for module, dists in importlib.metadata.packages_distributions().items()
                 if any(canonicalize_name(d) in wanted for d in dists)}
    # a declared distribution that is not installed here (e.g. the docs extra after `pip install .[test]`) counts
    # under its own name, the module name of every such distribution the suite uses (mkdocs)
    return installed | {name.replace("-", "_") for name in wanted}


def importorskip_targets(tree: ast.AST) -> list[str]:
    return [node.args[0].value for node in ast.walk(tree)
            if isinstance(node, ast.Call) and call_name(node) == "pytest.importorskip" and node.args
            and isinstance(node.args[0], ast.Constant)]


def violations(folder: Path, installed: set[str]) -> set[str]:
    suite = Suite(folder)
    found = set()
    for name, module in suite.modules.items():
        if name.startswith("test_"):
            for test in module.tests():
                if not suite.body_checks(name, test):
                    found.add(f"{module.path.name}:{test.name} checks nothing")
        for node in self_comparisons(module.tree):
            found.add(f"{module.path.name}:{node.lineno} compares {ast.unparse(node)[:80]} with itself")
        for target in importorskip_targets(module.tree):
            top = target.partition(".")[0]
            if top not in STDLIB and top not in installed:
                found.add(f"{module.path.name}:importorskip({target!r}) is not installed by the test extra")
    return found


@pytest.fixture(scope="module")
def installed():
    if sys.version_info < (3, 11):
        pytest.skip("reads pyproject.toml with tomllib (Python >= 3.11)")
    return installed_by_test_extra()


def test_the_suite_follows_its_conventions(installed):
    assert violations(TESTS, installed) - PENDING == set()


def test_pending_violations_are_still_there(installed):
    """Each PENDING entry is removed once the change that fixes it is merged (this test then names it)."""
    fixed = PENDING - violations(TESTS, installed)
    assert not fixed, f"fixed since: remove {sorted(fixed)} from PENDING"


@pytest.mark.parametrize(
    ("source", "rule"),
    [
        ("def test_x():\n    x = 1\n", "checks nothing"),
        ("def helper():\n    return 1\n\ndef test_x():\n    helper()\n", "checks nothing"),
        ("def test_x():\n    assert y == y\n", "with itself"),
        ("def test_x():\n    torch.testing.assert_close(a.b, a.b)\n", "with itself"),
        ("def test_x():\n    assert torch.equal(t[0], t[0])\n", "with itself"),
        ("import pytest\nmpl = pytest.importorskip('not_a_test_dependency')\n", "not installed by the test extra"),
    ],
)
def test_each_rule_catches_its_violation(source, rule, tmp_path, installed):
    (tmp_path / "test_example.py").write_text(source)
    assert any(rule in v for v in violations(tmp_path, installed)), violations(tmp_path, installed)


@pytest.mark.parametrize(
    "source",
    [
        "def test_x():\n    assert f() == 1\n",
        "import pytest\ndef test_x():\n    with pytest.raises(ValueError):\n        f()\n",
        "def check(v):\n    assert v\n\ndef helper(v):\n    check(v)\n\ndef test_x():\n    helper(1)\n",
        "def test_x():\n    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)\n",
        "import subprocess\ndef test_x():\n    subprocess.run(['true'], check=True)\n",
        "import pytest\nPIL = pytest.importorskip('PIL.Image')\ntoml = pytest.importorskip('tomllib')\n",
    ],
)
def test_a_real_check_passes(source, tmp_path, installed):
    (tmp_path / "test_example.py").write_text(source)
    assert violations(tmp_path, installed) == set()


def test_helpers_imported_from_other_test_modules_count(tmp_path):
    (tmp_path / "support.py").write_text("def expect_one(v):\n    assert v == 1\n")
    (tmp_path / "test_example.py").write_text("from support import expect_one\n\ndef test_x():\n    expect_one(1)\n")
    assert violations(tmp_path, set()) == set()
    (tmp_path / "support.py").write_text("def expect_one(v):\n    return v == 1\n")
    assert violations(tmp_path, set()) == {"test_example.py:test_x checks nothing"}
