"""Shared bits of the testbed training scripts: repo paths, seeding, results files."""

from __future__ import annotations

import json
import platform
import random
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run from a checkout without installing


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def write_results(name: str, payload: dict) -> Path:
    """Write benchmarks/results/<name>.json with the command line and machine next to the numbers."""
    path = REPO / "benchmarks" / "results" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"command": "python " + " ".join(sys.argv), "machine": platform.processor() or platform.machine(),
               "torch": torch.__version__, **payload}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def train_classifier(model: torch.nn.Module, pixels: torch.Tensor, labels: torch.Tensor, steps: int,
                     batch_size: int = 128, lr: float = 1e-3, weight_decay: float = 0.05, warmup: int = 100,
                     seed: int = 0, desc: str = "train") -> float:
    """AdamW + warm-up + cosine, cross-entropy with label smoothing 0.1; returns the last logged loss."""
    import math

    from tqdm.auto import tqdm

    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0}],
                            lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    loss_value = float("nan")
    bar = tqdm(range(steps), desc=desc, mininterval=5)
    for step in bar:
        idx = torch.randint(len(labels), (batch_size,), generator=gen)
        logits = model(pixel_values=pixels[idx]).logits
        loss = torch.nn.functional.cross_entropy(logits, labels[idx], label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            loss_value = loss.item()
            bar.set_postfix(loss=f"{loss_value:.3f}")
    model.eval()
    return loss_value
