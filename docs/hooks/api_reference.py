"""What the API reference must hold: every name of `peft_effadapt.__all__` on an API page (a `::: peft_effadapt.Name`
directive in docs/api/*.md), each with its own docstring in the peft style. Used by the mkdocs hook (the strict
build fails on a gap) and by tests/test_docs.py (the default test run, without mkdocs)."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

DIRECTIVE = re.compile(r"^:::\s*peft_effadapt\.(\w+)\s*$", re.M)
# metadata, not an API object: documented in the changelog and the installation notes
NOT_DOCUMENTED = {"__version__"}


def documented_names(api_dir: Path) -> dict[str, str]:
    """Name -> API page for every `::: peft_effadapt.Name` directive."""
    found = {}
    for page in sorted(api_dir.glob("*.md")):
        for name in DIRECTIVE.findall(page.read_text()):
            found[name] = page.name
    return found


# A tuner (peft `BaseTuner` subclass) is built by `get_peft_model` / `PeftModel.from_pretrained` from its config, with
# peft's constructor: the same Args for every method, generated into each tuner's reference from here.
TUNER_ARGS = """Args:
    model (torch.nn.Module): The model to adapt (peft passes the user's model).
    peft_config (PeftConfig | dict[str, PeftConfig]): The method's config, or configs by adapter name.
    adapter_name (str): Name of the adapter, `"default"` unless given.
    low_cpu_mem_usage (bool): Create the adapter weights on the meta device (peft's loading path).
    state_dict (dict[str, torch.Tensor] | None): Weights to be loaded, used by peft to find the target modules."""


def is_tuner(cls: type) -> bool:
    from peft.tuners.tuners_utils import BaseTuner

    return isinstance(cls, type) and issubclass(cls, BaseTuner)


def own_fields(cls: type) -> list[dataclasses.Field]:
    """The dataclass fields a peft_effadapt class declares itself or inherits from another peft_effadapt class (not
    peft's own PeftConfig fields, which peft documents)."""
    ours = {name for klass in cls.__mro__ if klass.__module__.startswith("peft_effadapt")
            for name in vars(klass).get("__annotations__", {})}
    return [f for f in dataclasses.fields(cls) if f.name in ours]


def args_lines(doc: str | None) -> list[str]:
    """The lines of a docstring's Args section (dedented docstring; empty without one)."""
    lines = inspect.cleandoc(doc or "").splitlines()
    if "Args:" not in lines:
        return []
    section = []
    for line in lines[lines.index("Args:") + 1:]:
        if line and not line.startswith(" "):
            break
        section.append(line)
    return [line for line in section if line.strip()]


def inherited_args(cls: type) -> list[str]:
    """The Args lines of the peft_effadapt base classes' own docstrings (their fields are the subclass's too)."""
    return [line for base in cls.__mro__[1:] if base.__module__.startswith("peft_effadapt")
            for line in args_lines(vars(base).get("__doc__"))]


def docstring_gaps(obj: object, name: str) -> list[str]:
    """What the docstring of one public object lacks: its own text; Args for a callable that takes arguments (a
    config's Args are generated from its fields' help, so each field needs help, or its handwritten Args name every
    field); Returns for a function."""
    own = obj.__doc__ if inspect.isfunction(obj) else vars(obj).get("__doc__") if inspect.isclass(obj) else None
    if not (own or "").strip():
        return [f"{name} has no docstring of its own"]
    gaps = []
    if inspect.isclass(obj) and dataclasses.is_dataclass(obj):
        if "Args:" in own:  # written by hand (with its bases' Args): it must name every field
            args = "\n".join(args_lines(own) + inherited_args(obj))
            return [f"{name}'s Args section does not name its field {f.name}" for f in own_fields(obj)
                    if not re.search(rf"^\s+{f.name}\b", args, re.M)]
        return [f"{name}.{f.name} has no help text (field metadata 'help')" for f in own_fields(obj)
                if not f.metadata.get("help")]
    if is_tuner(obj):  # constructor Args generated (TUNER_ARGS)
        return gaps
    target = obj.__init__ if inspect.isclass(obj) else obj
    try:
        parameters = [p for p in inspect.signature(target).parameters if p not in ("self", "args", "kwargs")]
    except (TypeError, ValueError):
        parameters = []
    if parameters and "Args:" not in own:
        gaps.append(f"{name} takes {', '.join(parameters)} but its docstring has no Args section")
    if inspect.isfunction(obj) and "Returns:" not in own:
        gaps.append(f"{name} is a function whose docstring has no Returns section")
    return gaps


def reference_gaps(api_dir: Path) -> list[str]:
    """Every reason the API reference is incomplete (empty when every public name is documented)."""
    import peft_effadapt

    public = [name for name in peft_effadapt.__all__ if name not in NOT_DOCUMENTED]
    documented = documented_names(api_dir)
    gaps = [f"peft_effadapt.{name} is in __all__ but on no page of {api_dir.name}/" for name in public
            if name not in documented]
    gaps += [f"{page} documents peft_effadapt.{name}, which is not in __all__" for name, page in documented.items()
             if name not in public]
    for name in public:
        gaps += docstring_gaps(getattr(peft_effadapt, name), name)
    return gaps
