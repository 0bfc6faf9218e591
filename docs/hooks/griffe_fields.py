"""A griffe extension for the API reference: a peft_effadapt config's Args section is generated from its dataclass
fields (annotation, default, the `help` text peft's configs carry in their field metadata), so the reference shows
every field without the help being written twice; ``[`Name`]`` references in docstrings become links."""

from __future__ import annotations

import dataclasses
import importlib
import re
import sys
from pathlib import Path

import griffe

sys.path.insert(0, str(Path(__file__).parent))
from api_reference import TUNER_ARGS, inherited_args, is_tuner, own_fields  # noqa: E402

REFERENCE = re.compile(r"\[`(\w+)`\](?![\[(])")


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        return repr(field.default)
    if field.default_factory is not dataclasses.MISSING:
        return repr(field.default_factory())
    return "required"


def _args_section(cls: type) -> str:
    lines = ["Args:"]
    for field in own_fields(cls):
        text = " ".join(field.metadata.get("help", "").split())
        annotation = str(field.type).replace("\n", " ")
        lines.append(f"    {field.name} ({annotation}): {text} Defaults to `{_default(field)}`.")
    return "\n".join(lines)


class ConfigFieldsAndLinks(griffe.Extension):
    """Adds the generated Args section to every dataclass of the package; links ``[`Name`]`` to `peft_effadapt.Name`."""

    def __init__(self) -> None:
        import peft_effadapt

        self.public = set(peft_effadapt.__all__)

    def _link(self, text: str) -> str:
        return REFERENCE.sub(lambda m: f"[`{m[1]}`][peft_effadapt.{m[1]}]" if m[1] in self.public else m[0], text)

    def on_class_members(self, *, cls: griffe.Class, **kwargs) -> None:
        if not cls.path.startswith("peft_effadapt") or cls.docstring is None:
            return
        real = getattr(importlib.import_module(cls.module.path), cls.name, None)
        text = cls.docstring.value
        if isinstance(real, type) and "Args:" not in text:
            if dataclasses.is_dataclass(real) and own_fields(real):
                text = f"{text.rstrip()}\n\n{_args_section(real)}"
            elif is_tuner(real):
                text = f"{text.rstrip()}\n\n{TUNER_ARGS}"
        elif isinstance(real, type) and dataclasses.is_dataclass(real) and text.rstrip().splitlines()[-1][:1] == " ":
            text = "\n".join([text.rstrip(), *inherited_args(real)])  # a handwritten Args section ends the docstring
        cls.docstring.value = self._link(text)

    def on_function_instance(self, *, func: griffe.Function, **kwargs) -> None:
        if func.path.startswith("peft_effadapt") and func.docstring is not None:
            func.docstring.value = self._link(func.docstring.value)
