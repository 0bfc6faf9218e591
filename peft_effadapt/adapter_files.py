"""Checks an adapter's weights file before any model is touched: safetensors only, complete and readable."""

from __future__ import annotations

import os

from huggingface_hub import hf_hub_download
from peft.utils import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from safetensors import safe_open

from .adapter_checks import FILE_KEYS_ATTR, check_config_fields

_DOWNLOAD_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "force_download")


def check_adapter_weights(path_or_repo: str, subfolder: str | None = None, **download_kwargs) -> str | None:
    """Returns the local path of ``adapter_model.safetensors`` after reading every tensor in it.

    Raises ``ValueError`` naming the file when it is truncated, is not a safetensors file, or when only a pickled
    ``adapter_model.bin`` exists (this package never unpickles adapter files). Returns None when the file cannot be
    fetched here; the loader that runs next then reports that itself.
    """
    folder = os.path.join(path_or_repo, subfolder) if subfolder else path_or_repo
    if os.path.isdir(folder):
        weights = os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)
        if not os.path.isfile(weights):
            if os.path.isfile(os.path.join(folder, WEIGHTS_NAME)):
                raise ValueError(
                    f"{folder} holds only a pickled {WEIGHTS_NAME}; peft_effadapt loads adapters from "
                    f"{SAFETENSORS_WEIGHTS_NAME} only and never unpickles files. Convert it in a trusted environment."
                )
            raise ValueError(f"No {SAFETENSORS_WEIGHTS_NAME} in adapter folder {folder}.")
    else:
        kwargs = {k: v for k, v in download_kwargs.items() if k in _DOWNLOAD_KWARGS}
        try:
            weights = hf_hub_download(path_or_repo, SAFETENSORS_WEIGHTS_NAME, subfolder=subfolder, **kwargs)
        except Exception:  # noqa: BLE001 - unreachable or absent: the loader that follows raises its own error
            return None
    try:
        with safe_open(weights, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open handles have keys(), not iteration
                handle.get_tensor(key)
    except Exception as err:  # safetensors raises its own SafetensorError, which is not a ValueError
        raise ValueError(f"Adapter weights file {weights} is damaged or not a safetensors file: {err}") from err
    return weights


def check_saved_module_keys(config, keys: list[str], weights: str) -> None:
    """Every tensor in the file must be either a tensor of the config's own method (its key holds ``.<prefix>``) or
    a tensor of a module named in ``modules_to_save``. Raises ValueError naming the stray keys before any model is
    touched (peft would ignore them silently). Missing tensors of the method itself are caught by
    `adapter_checks.check_adapter_tensors`; a module of ``modules_to_save`` may legitimately have none (the name
    matched nothing in the model it was saved from)."""
    from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING

    prefix = PEFT_TYPE_TO_PREFIX_MAPPING.get(config.peft_type)
    if not prefix:
        return
    saved = [name for name in (config.modules_to_save or []) if isinstance(name, str)]
    other = [key.removeprefix("base_model.model.") for key in keys if f".{prefix}" not in key]

    def module_of(key: str) -> str | None:
        return next((name for name in saved if key.startswith(name + ".") or f".{name}." in key), None)

    stray = [key for key in other if module_of(key) is None]
    if stray:
        raise ValueError(
            f"Adapter weights file {weights} holds tensors that belong neither to the {config.peft_type} adapter nor "
            f"to its modules_to_save {saved}: {stray[:5]}{' ...' if len(stray) > 5 else ''}. The file is damaged or "
            "its adapter_config.json does not describe it."
        )


class VerifiedAdapterFilesMixin:
    """For PEFT configs: ``from_pretrained`` checks the weights file next to the config before returning, so that
    ``PeftModel.from_pretrained`` / ``load_adapter`` fail before they inject anything into the user's model; every
    config checks its fields against their type annotations (`check_config_fields`) before its own checks run."""

    def __post_init__(self):
        super().__post_init__()
        check_config_fields(self)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        weights = check_adapter_weights(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        if weights is not None:
            with safe_open(weights, framework="pt") as handle:
                keys = list(handle.keys())
            check_saved_module_keys(config, keys, weights)
            # For the tuner's injection that follows (one use): which tensors the file holds, so that a module of
            # modules_to_save without its tensors is refused before the model is touched (see adapter_checks).
            object.__setattr__(config, FILE_KEYS_ATTR, (tuple(config.modules_to_save or ()), frozenset(keys), weights))
        return config
