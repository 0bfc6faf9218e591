"""`AnchorMemory`: EMA features of the labelled anchors, one row per pool id, kept across rounds."""

from __future__ import annotations

import torch


class AnchorMemory:
    """M in R^{N x d}, zeros at start, never reset between rounds ("visual persistence").

    `update(ids, features)` writes M[ids] <- (1 - m) M[ids] + m f to the rows of those POOL ids (the release
    indexed rows by the labelled loader's local position; see the spec, bug B1). The dimension is fixed by the
    first update. Features are stored detached, so no gradient ever reaches the memory.
    """

    def __init__(self, num_rows: int, momentum: float = 0.9, dim: int | None = None):
        if not 0 < momentum <= 1:
            raise ValueError(f"momentum must lie in (0, 1], got {momentum!r}.")
        self.num_rows, self.momentum = int(num_rows), float(momentum)
        self.bank = torch.zeros(self.num_rows, dim) if dim else None

    @torch.no_grad()
    def update(self, ids, features: torch.Tensor) -> None:
        ids = torch.as_tensor(ids, dtype=torch.long).flatten()
        features = features.detach().float().flatten(1).cpu()
        if features.shape[0] != ids.numel():
            raise ValueError(f"{ids.numel()} ids for {features.shape[0]} feature rows.")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_rows):
            raise ValueError(f"memory ids must lie in [0, {self.num_rows}), got {ids.min()}..{ids.max()}.")
        if self.bank is None:
            self.bank = torch.zeros(self.num_rows, features.shape[1])
        if features.shape[1] != self.bank.shape[1]:
            raise ValueError(f"memory rows have {self.bank.shape[1]} features, got {features.shape[1]}.")
        self.bank[ids] = (1 - self.momentum) * self.bank[ids] + self.momentum * features

    def rows(self, ids) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.long).flatten()
        if self.bank is None:
            return torch.zeros(ids.numel(), 0)
        return self.bank[ids]

    def state_dict(self) -> dict[str, torch.Tensor]:
        bank = self.bank if self.bank is not None else torch.zeros(self.num_rows, 0)
        return {"bank": bank.contiguous(), "momentum": torch.tensor(self.momentum, dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        bank = state.get("bank")
        if bank is None or bank.ndim != 2 or bank.shape[0] != self.num_rows:
            raise ValueError(f"anchor memory must be ({self.num_rows}, d), got "
                             f"{None if bank is None else tuple(bank.shape)}.")
        self.bank = bank.float().clone() if bank.shape[1] else None
