"""Saving and reloading slimmed models: `model.safetensors` + `slimming_plan.json` (+ `config.json` for HF models);
`load_slimmed` rebuilds the stock architecture, replays the plan, checks every shape, then loads strictly."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .plan import PLAN_NAME, SlimmingPlan
from .surgery import applied_plan, apply_plan

WEIGHTS_NAME = "model.safetensors"
CONFIG_MIRROR = "peft_effadapt_slimming"


def save_slimmed(model: nn.Module, plan: SlimmingPlan | None, directory: str | os.PathLike) -> Path:
    """Saves a slimmed model with its slimming plan, so that [`load_slimmed`] rebuilds it exactly.

    Writes `model.safetensors` (+ `config.json` for HF models, which also gets a short mirror of the plan under
    `peft_effadapt_slimming`) and `slimming_plan.json`.

    Args:
        model (nn.Module): The slimmed model.
        plan (SlimmingPlan | None): The plan it was slimmed with; None uses the plan recorded by `apply_plan` (and
            by the pruning callbacks).
        directory (str | os.PathLike): Folder to write (created if missing).

    Returns:
        Path: The folder written.

    Raises:
        ValueError: No plan given or recorded, or a plan that differs from the recorded one.
    """
    from safetensors.torch import save_file

    recorded = applied_plan(model)
    if plan is None:
        if recorded is None:
            raise ValueError("The model carries no applied slimming plan: pass the plan or slim it with apply_plan.")
        plan = recorded
    elif recorded is not None and plan.to_dict()["groups"] != recorded.to_dict()["groups"]:
        raise ValueError("The plan passed differs from the one applied to this model (several rounds?); pass "
                         "plan=None to save the combined plan that apply_plan recorded.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "save_pretrained"):
        setattr(config, CONFIG_MIRROR, {"plan_file": PLAN_NAME, "method": plan.method, "widths": plan.widths})
        if not getattr(config, "architectures", None):
            config.architectures = [type(model).__name__]
        config.save_pretrained(directory)
    # The live module names are written as they are (transformers' save_pretrained may rename keys to an older
    # layout, e.g. ViT's encoder.layer.N.intermediate.dense); tied tensors are stored as copies.
    state, seen = {}, set()
    for key, value in model.state_dict().items():
        value = value.detach().cpu().contiguous()
        pointer = (value.untyped_storage().data_ptr(), value.storage_offset()) if value.numel() else None
        state[key] = value.clone() if pointer in seen else value
        seen.add(pointer)
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    plan.save(directory)
    return directory


def load_slimmed(directory: str | os.PathLike, model_class=None, *, revision: str | None = None,
                 device: str | torch.device | None = None, dtype: torch.dtype | str | None = None,
                 channels_last: bool | None = None, **kwargs) -> nn.Module:
    """Rebuilds a slimmed model saved by [`save_slimmed`] and places it for inference.

    The stock architecture from `config.json` (class from `config.architectures` unless `model_class` is given), the
    plan applied, every tensor shape checked against `model.safetensors`, then a strict load.
    `ignore_mismatched_sizes` is refused (it would re-initialise pruned layers silently).

    Args:
        directory (str | os.PathLike): A folder, or a Hub repo id pushed with
            `peft_effadapt.hub.push_slimmed_model_to_hub`.
        model_class (optional): The model class; for plain torch models a zero-argument factory of the unslimmed model.
        revision (str | None): Hub revision of a repo id.
        device: Where the model goes (default: CPU).
        dtype: A floating dtype to cast to, e.g. `torch.bfloat16` or `"bfloat16"` (default: as saved).
        channels_last (bool | None): Store 4-D conv weights channels-last (NHWC), the layout of cuDNN's tensor-core
            convolutions. Default (None): True for a model with 2-D convolutions on CUDA, else False.
        **kwargs: None are taken; `ignore_mismatched_sizes=True` is refused with a clear error.

    Returns:
        nn.Module: The slimmed model in eval mode.

    Raises:
        ValueError: A bad `device` / `dtype` / `channels_last` (before anything is read), plan and weights that do
            not match (before anything is loaded), no known architecture, or `ignore_mismatched_sizes=True`.
        FileNotFoundError: No `model.safetensors` in the folder.
        TypeError: An unknown keyword argument.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    if kwargs.pop("ignore_mismatched_sizes", False):
        raise ValueError("load_slimmed refuses ignore_mismatched_sizes=True: mismatched tensors mean the plan does not "
                         "describe these weights, and re-initialising them would silently destroy the model.")
    if kwargs:
        raise TypeError(f"load_slimmed got unexpected arguments {sorted(kwargs)}.")
    device, dtype = _placement(device, dtype, channels_last)
    if not Path(directory).is_dir():
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import EntryNotFoundError

        repo_id, files = str(directory), {}
        for name in (PLAN_NAME, WEIGHTS_NAME, "config.json"):
            try:
                files[name] = hf_hub_download(repo_id, name, revision=revision)
            except EntryNotFoundError:
                if name != "config.json":
                    raise
        directory = Path(files[PLAN_NAME]).parent
    directory = Path(directory)
    plan = SlimmingPlan.load(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"No {WEIGHTS_NAME} in {directory}.")
    model = _build(directory, model_class)
    apply_plan(model, plan)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with safe_open(str(weights), framework="pt") as handle:
        stored = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}  # noqa: SIM118
    problems = [f"missing {k} {s}" for k, s in expected.items() if k not in stored]
    problems += [f"unexpected {k} {s}" for k, s in stored.items() if k not in expected]
    problems += [f"{k}: weights {stored[k]} vs plan {s}" for k, s in expected.items() if k in stored and stored[k] != s]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... ({len(problems)} in all)" if len(problems) > 8 else "")
        raise ValueError(f"{PLAN_NAME} in {directory} does not match {WEIGHTS_NAME}: {shown}.")
    model.load_state_dict(load_file(str(weights)), strict=True)
    model.to(device=device, dtype=dtype)
    if channels_last is None:
        channels_last = device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in model.modules())
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model.eval()


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _placement(device, dtype, channels_last) -> tuple[torch.device, torch.dtype | None]:
    """`load_slimmed`'s device (a `torch.device`, CPU by default) and dtype (None: as saved), checked."""
    try:
        device = torch.device("cpu" if device is None else device)
    except (RuntimeError, TypeError):
        raise ValueError(f"load_slimmed: device={device!r} is not a torch device (e.g. 'cuda', 'cuda:1', 'cpu')."
                         ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"load_slimmed: device={str(device)!r}, but CUDA is not available here.")
    if isinstance(dtype, str):
        if dtype.removeprefix("torch.") not in _DTYPES:
            raise ValueError(f"load_slimmed: dtype={dtype!r} is not one of {sorted(_DTYPES)}.")
        dtype = _DTYPES[dtype.removeprefix("torch.")]
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"load_slimmed: dtype must be a floating torch.dtype or its name, got {dtype!r}.")
    if channels_last is not None and not isinstance(channels_last, bool):
        raise ValueError(f"load_slimmed: channels_last must be True, False or None (automatic), got "
                         f"{channels_last!r}.")
    return device, dtype


def _build(directory: Path, model_class) -> nn.Module:
    config_path = directory / "config.json"
    if not config_path.is_file():
        if model_class is None:
            raise ValueError(f"{directory} has no config.json: pass model_class, a factory of the unslimmed model.")
        return model_class()
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(directory)
    if hasattr(config, CONFIG_MIRROR):
        delattr(config, CONFIG_MIRROR)
    if model_class is None:
        names = getattr(config, "architectures", None) or []
        if not names or not hasattr(transformers, names[0]):
            raise ValueError(f"config.json in {directory} names no known architecture ({names}); pass model_class.")
        model_class = getattr(transformers, names[0])
    torch_dtype = getattr(config, "dtype", None)
    model = model_class(config)
    if isinstance(torch_dtype, torch.dtype):
        model = model.to(torch_dtype)
    return model
