"""The compiled inference path of every PEFT type: one call that a GPU user makes before timing or serving.

Token merging, slimmed CNNs and merged adapters only pay off on a fast GPU when the forward is one compiled graph
replayed without per-op host cost (CUDA graphs, ``mode="reduce-overhead"``).
"""

from __future__ import annotations

import torch
from torch import nn

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_for_inference(model: nn.Module, *, mode: str = "default", fullgraph: bool = True, dynamic: bool = False):
    """Compiles `model` for inference: eval mode, one graph (`fullgraph=True`), static shapes (`dynamic=False`).

    Args:
        model: a PEFT model, a merged model, a slimmed model or a task wrapper.
        mode: a `torch.compile` mode; `"reduce-overhead"` (CUDA graphs) is the GPU mode.
        fullgraph: fail on a graph break instead of running part of the forward eagerly.
        dynamic: False compiles one graph per input shape (each new batch size compiles once).

    Returns:
        The compiled module (call it like `model`).

    Raises:
        ValueError: `mode` is not a `torch.compile` mode.
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile_for_inference: mode={mode!r} is not one of {COMPILE_MODES}")
    model.eval()
    return torch.compile(model, mode=mode, fullgraph=fullgraph, dynamic=dynamic)
