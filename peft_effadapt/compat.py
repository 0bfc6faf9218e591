"""The supported stack and its one gated route: transformers' own adapter methods.

transformers >= 5.24 lets its `PreTrainedModel.add_adapter`, `set_adapter`, `enable_adapters`, `disable_adapters`,
`active_adapters`, `get_adapter_state_dict` and `delete_adapter` run only with peft >= 0.22, while this package is
built on peft 0.21 (see pyproject.toml). transformers' own message then advises a peft upgrade that would break
every method here; `install()` makes that refusal a ValueError that names both versions and the routes that work.
`model.load_adapter(dir)` and `ModelClass.from_pretrained(adapter_dir)` are not gated and keep working.
"""

from __future__ import annotations

import importlib.metadata

import transformers
from packaging.version import Version

GATED_METHODS = ("add_adapter", "set_adapter", "enable_adapters", "disable_adapters", "active_adapters",
                 "get_adapter_state_dict", "delete_adapter")


class TransformersAdapterRouteError(ValueError):
    """transformers' own adapter methods refuse the installed peft; peft's API does the same job."""


def min_peft_for_transformers_adapters() -> str | None:
    """The peft version transformers' own adapter methods demand (None when this transformers has none)."""
    from transformers.integrations import peft as integration

    return getattr(integration, "MIN_PEFT_VERSION", None)


def transformers_adapter_methods_gated() -> bool:
    """True when transformers' `model.add_adapter` & co. refuse the installed peft."""
    needed = min_peft_for_transformers_adapters()
    return needed is not None and Version(importlib.metadata.version("peft")) < Version(needed)


def gated_route_message(min_version: str | None = None) -> str:
    return (
        f"transformers {transformers.__version__} runs its own adapter methods ({', '.join(GATED_METHODS)}) only with "
        f"peft >= {min_version or min_peft_for_transformers_adapters()}, and peft_effadapt is built for peft 0.21.x (installed: "
        f"{importlib.metadata.version('peft')}). Upgrading peft would break peft_effadapt. Use peft's API, which does "
        "the same: get_peft_model(model, config), PeftModel.from_pretrained(model, adapter_dir), "
        "peft_model.set_adapter / disable_adapter() / delete_adapter, get_peft_model_state_dict; "
        "`model.load_adapter(adapter_dir)` itself still works. Or install transformers < 5.24."
    )


def install() -> None:
    """Wraps the version check transformers' adapter methods call, so that their refusal names both versions."""
    from transformers.integrations import peft as integration

    original = getattr(integration, "check_peft_version", None)
    if original is None or getattr(original, "_peft_effadapt", False):
        return

    def check_peft_version(min_version: str) -> None:
        try:
            original(min_version=min_version)
        except ValueError as err:
            raise TransformersAdapterRouteError(gated_route_message(min_version)) from err

    check_peft_version._peft_effadapt = True
    integration.check_peft_version = check_peft_version
