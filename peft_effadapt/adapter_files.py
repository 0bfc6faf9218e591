"""Checks an adapter's weights file before any model is touched: safetensors only, complete and readable."""

from __future__ import annotations

import os

from huggingface_hub import hf_hub_download
from peft.utils import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from safetensors import safe_open

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


class VerifiedAdapterFilesMixin:
    """For PEFT configs: ``from_pretrained`` checks the weights file next to the config before returning, so that
    ``PeftModel.from_pretrained`` / ``load_adapter`` fail before they inject anything into the user's model."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        check_adapter_weights(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        return config
