"""Checks an adapter's weights file before any model is touched: safetensors only, complete and readable."""

from __future__ import annotations

import os
from dataclasses import dataclass

from huggingface_hub import hf_hub_download
from peft.utils import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from safetensors import safe_open

_DOWNLOAD_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "force_download")


# safetensors' dtype names -> torch's (as error messages show them)
_DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
                "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
                "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool"}


@dataclass(frozen=True)
class SavedTensor:
    shape: tuple[int, ...]
    dtype: str  # torch's name: "float32", "bfloat16", "int32", ...

    @property
    def is_floating_point(self) -> bool:
        return self.dtype.startswith(("float", "bfloat"))


@dataclass(frozen=True)
class AdapterFile:
    """What an adapter's ``adapter_model.safetensors`` holds: its path and, per key, the tensor's shape and dtype."""

    path: str
    tensors: dict[str, SavedTensor]


def read_adapter_file(path_or_repo: str, subfolder: str | None = None, **download_kwargs) -> AdapterFile | None:
    """Reads every tensor of ``adapter_model.safetensors`` once and describes the file.

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
    tensors = {}
    try:
        with safe_open(weights, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open handles have keys(), not iteration
                handle.get_tensor(key)  # reads the bytes: a truncated file fails here, not half-way through a load
                sliced = handle.get_slice(key)
                tensors[key] = SavedTensor(tuple(sliced.get_shape()), _DTYPE_NAMES.get(sliced.get_dtype(), sliced.get_dtype()))
    except Exception as err:  # safetensors raises its own SafetensorError, which is not a ValueError
        raise ValueError(f"Adapter weights file {weights} is damaged or not a safetensors file: {err}") from err
    return AdapterFile(weights, tensors)


def check_saved_module_keys(config, adapter_file: AdapterFile) -> None:
    """Every tensor in the file must be either a tensor of the config's own method (its key holds ``.<prefix>``) or
    a tensor of a module named in ``modules_to_save``. Raises ValueError naming the stray keys before any model is
    touched (peft would ignore them silently). Missing tensors of the method itself are caught against the model
    (`tensors.check_file_fits_model`); a module of ``modules_to_save`` may legitimately have none (the name matched
    nothing in the model it was saved from)."""
    from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING

    prefix = PEFT_TYPE_TO_PREFIX_MAPPING.get(config.peft_type)
    if not prefix:
        return
    saved = [name for name in (config.modules_to_save or []) if isinstance(name, str)]
    other = [key.removeprefix("base_model.model.") for key in adapter_file.tensors if f".{prefix}" not in key]

    def module_of(key: str) -> str | None:
        return next((name for name in saved if key.startswith(name + ".") or f".{name}." in key), None)

    stray = [key for key in other if module_of(key) is None]
    if stray:
        raise ValueError(
            f"Adapter weights file {adapter_file.path} holds tensors that belong neither to the {config.peft_type} "
            f"adapter nor to its modules_to_save {saved}: {stray[:5]}{' ...' if len(stray) > 5 else ''}. The file is "
            "damaged or its adapter_config.json does not describe it."
        )
