"""Validation of what users hand us: config fields, adapter files, and adapter tensors against the model.

Plain functions: each takes the data it checks and raises ``ValueError`` naming the field, file, layer or shape;
`peft_hooks` calls them at the points of peft's load path where they run.
"""

from .config_fields import check_config_fields, check_known_fields, read_config_json
from .files import AdapterFile, SavedTensor, check_saved_module_keys, read_adapter_file
from .tensors import (
    check_adapter_tensors,
    check_file_fits_model,
    check_loaded_like_model,
    check_saved_modules_complete,
)
from .versions import VERSION_KEY, fields_to_drop, installed_version, newer_fields_warning, writer_version

__all__ = [
    "VERSION_KEY",
    "AdapterFile",
    "SavedTensor",
    "check_adapter_tensors",
    "check_config_fields",
    "check_file_fits_model",
    "check_known_fields",
    "check_loaded_like_model",
    "check_saved_module_keys",
    "check_saved_modules_complete",
    "fields_to_drop",
    "installed_version",
    "newer_fields_warning",
    "read_adapter_file",
    "read_config_json",
    "writer_version",
]
