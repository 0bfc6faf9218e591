"""Model access for LFTL: capture features at the head's input, batched eval-mode predictions over a dataset."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import numpy as np
import torch
from datasets import Dataset
from torch import nn

Preprocess = Callable[[dict], dict]


def default_preprocess(batch: dict) -> dict:
    """Every column of the batch as a tensor, passed to the model as a keyword argument."""
    return {k: torch.as_tensor(np.asarray(v)) for k, v in batch.items()}


def find_module(model: nn.Module, name: str) -> nn.Module:
    """The outermost submodule called `name` (also inside peft wrappers, e.g. `base_model.model.classifier`)."""
    hits = [(n, m) for n, m in model.named_modules() if n == name or n.endswith("." + name)]
    if not hits:
        raise ValueError(f"the model has no module named {name!r} whose input could serve as the feature; set "
                         f"LFTLConfig.feature_module to the classifier head's name.")
    return min(hits, key=lambda item: item[0].count("."))[1]


class FeatureCapture:
    """Records the (flattened) input of one module at every forward: `capture.features` after `model(...)`. The
    capture itself is the forward pre-hook, registered while `active()`."""

    def __init__(self, model: nn.Module, module_name: str):
        self.module = find_module(model, module_name)
        self.features: torch.Tensor | None = None
        self._handle = None

    def __call__(self, module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        self.features = x.flatten(1)

    @contextmanager
    def active(self):
        self._handle = self.module.register_forward_pre_hook(self, with_kwargs=True)
        try:
            yield self
        finally:
            self._handle.remove()


def logits_of(output) -> torch.Tensor:
    logits = output.logits if hasattr(output, "logits") else output
    if not torch.is_tensor(logits) or logits.ndim != 2:
        raise ValueError(f"the model must return logits shaped (batch, num_classes), got "
                         f"{type(logits).__name__} {tuple(getattr(logits, 'shape', ()))}.")
    return logits


def device_of(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def model_inputs(dataset: Dataset, ids, preprocess: Preprocess, device) -> dict:
    if dataset.format["type"] != "numpy":
        dataset = dataset.with_format("numpy")
    batch = dataset[list(map(int, ids))]
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in preprocess(batch).items()}


@torch.no_grad()
def predict(model: nn.Module, dataset: Dataset, ids, preprocess: Preprocess, batch_size: int = 256,
            feature_module: str | None = None, num_classes: int | None = None):
    """Eval-mode logits (and features at `feature_module`'s input) of `dataset` rows `ids`; restores the mode."""
    ids = [int(i) for i in ids]
    was_training = model.training
    model.eval()
    capture = FeatureCapture(model, feature_module) if feature_module else None
    logits, feats = [], []
    try:
        for start in range(0, len(ids), batch_size):
            inputs = model_inputs(dataset, ids[start:start + batch_size], preprocess, device_of(model))
            if capture:
                with capture.active():
                    out = logits_of(model(**inputs))
                feats.append(capture.features.float().cpu())
            else:
                out = logits_of(model(**inputs))
            if num_classes is not None and out.shape[1] != num_classes:
                raise ValueError(f"the model gives {out.shape[1]} logits per sample but the task has "
                                 f"{num_classes} classes.")
            logits.append(out.float().cpu())
    finally:
        model.train(was_training)
    empty = torch.zeros(0, num_classes or 0)
    return torch.cat(logits) if logits else empty, (torch.cat(feats) if feats else None)
