"""`LFTLConfig`: every hyper-parameter of LFTL's query-and-adapt loop, defaults = the official Office README row."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

MEMORY_UPDATES = ("epoch+step", "epoch")
CONTRAST_SPACES = ("prob", "logprob")


@dataclass
class LFTLConfig:
    """Configuration of [`ActiveAdaptationLoop`] (Lyu et al., "Learn from the Learnt: Source-Free Active Domain
    Adaptation via Contrastive Sampling and Visual Persistence", ECCV 2024).

    Defaults follow the official code's Office-31 README command (rounds 10, 1 % of the pool per round, alpha 0.03,
    class-balance lambda 0.1 over the top-100, beta_im 0.9, beta_vpa 1.0, memory momentum 0.9, 15 epochs, batch 64,
    SGD lr 1e-3 with backbone x0.1). `visda_c()` gives the VisDA-C row. The budget is either `ratio_per_round`
    (official) or `total_budget` (spread evenly, the last round topping up).
    """

    num_rounds: int = field(default=10, metadata={"help": "R query-and-adapt rounds."})
    ratio_per_round: float | None = field(default=0.01, metadata={"help": "rho: fraction of the pool per round."})
    total_budget: int | None = field(default=None, metadata={"help": "B labels in all; overrides ratio_per_round."})
    cd_ratio: float = field(default=0.03, metadata={"help": "alpha: q = p + alpha * (p - p_prev)."})
    contrast_space: str = field(default="prob", metadata={"help": "'prob' (official code) or 'logprob'."})
    class_balance_lambda: float = field(default=0.1, metadata={"help": "lambda of the class-balance penalty."})
    class_balance_topk: int = field(default=100, metadata={"help": "kappa most confident samples that count."})
    beta_im: float = field(default=0.9, metadata={"help": "Weight of SHOT information maximisation."})
    beta_vpa: float = field(default=1.0, metadata={"help": "Weight of the anchor-similarity entropy."})
    vpa_temperature: float = field(default=1.0, metadata={"help": "Temperature of the cosine softmax (1 = paper)."})
    memory_momentum: float = field(default=0.9, metadata={"help": "m: M <- (1 - m) M + m f."})
    memory_update: str = field(default="epoch+step", metadata={"help": "'epoch+step' (paper) or 'epoch' (release)."})
    lambda_mixup: float = field(default=1.0, metadata={"help": "Weight of the epoch-end labelled mixup (0 = off)."})
    mixup_alpha: float = field(default=0.75, metadata={"help": "Beta(a, a) of the mixup coefficient."})
    unlabelled_per_epoch: int | str | None = field(
        default=None, metadata={"help": "None: all unlabelled samples per epoch; 'efficient': |L|*(ceil(2B/|L|)-1) "
                                        "drawn with replacement (official VisDA mode); int: that many, drawn."})
    epochs_per_round: float = field(default=15, metadata={"help": "Epochs over the unlabelled set per round."})
    batch_size: int = field(default=64, metadata={"help": "Labelled and unlabelled batch size (each)."})
    eval_batch_size: int = field(default=256, metadata={"help": "Batch size of scoring and evaluation passes."})
    lr: float = field(default=1e-3, metadata={"help": "Base learning rate."})
    backbone_lr_mult: float = field(default=0.1, metadata={"help": "lr multiplier of non-head parameters."})
    head_lr_mult: float = field(default=1.0, metadata={"help": "lr multiplier of the head parameters."})
    head_modules: tuple[str, ...] = field(default=("classifier",), metadata={"help": "Names of head modules."})
    weight_decay: float = field(default=1e-3, metadata={"help": "SGD weight decay."})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum."})
    nesterov: bool = field(default=True, metadata={"help": "Nesterov momentum."})
    lr_gamma: float = field(default=10.0, metadata={"help": "lr = lr0 * (1 + gamma * t / T) ** -power."})
    lr_power: float = field(default=0.75, metadata={"help": "See lr_gamma."})
    feature_module: str = field(default="classifier", metadata={"help": "Features = input of this module."})
    seed: int = field(default=2023, metadata={"help": "Seed of sampling, shuffles, mixup and training."})

    def __post_init__(self):
        self.head_modules = tuple(self.head_modules)
        for name in ("num_rounds", "class_balance_topk", "batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}.")
        if self.total_budget is None and self.ratio_per_round is None:
            raise ValueError("set ratio_per_round or total_budget.")
        if self.total_budget is not None and (not isinstance(self.total_budget, int) or self.total_budget < 0):
            raise ValueError(f"total_budget must be a non-negative int, got {self.total_budget!r}.")
        if self.total_budget is None and not 0 <= self.ratio_per_round <= 1:
            raise ValueError(f"ratio_per_round must lie in [0, 1], got {self.ratio_per_round!r}.")
        if self.contrast_space not in CONTRAST_SPACES:
            raise ValueError(f"contrast_space must be one of {CONTRAST_SPACES}, got {self.contrast_space!r}.")
        if self.memory_update not in MEMORY_UPDATES:
            raise ValueError(f"memory_update must be one of {MEMORY_UPDATES}, got {self.memory_update!r}.")
        if not 0 < self.memory_momentum <= 1:
            raise ValueError(f"memory_momentum must lie in (0, 1], got {self.memory_momentum!r}.")
        if self.vpa_temperature <= 0 or self.mixup_alpha <= 0:
            raise ValueError("vpa_temperature and mixup_alpha must be positive.")
        for name in ("cd_ratio", "class_balance_lambda", "beta_im", "beta_vpa", "lambda_mixup", "lr",
                     "weight_decay", "momentum", "epochs_per_round"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}.")
        u = self.unlabelled_per_epoch
        if not (u is None or u == "efficient" or (isinstance(u, int) and not isinstance(u, bool) and u >= 1)):
            raise ValueError(f"unlabelled_per_epoch must be None, 'efficient' or a positive int, got {u!r}.")

    @classmethod
    def visda_c(cls, **overrides) -> LFTLConfig:
        """The official VisDA-C README row (B = 1 %, topk 500, beta_vpa 10, 10 epochs, efficient unlabelled mode)."""
        base = dict(ratio_per_round=0.001, class_balance_topk=500, beta_vpa=10.0, epochs_per_round=10,
                    unlabelled_per_epoch="efficient")
        return cls(**{**base, **overrides})

    @classmethod
    def office31(cls, **overrides) -> LFTLConfig:
        """The official Office-31 README row (= the defaults); Office-Home has no published command."""
        return cls(**overrides)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["head_modules"] = list(self.head_modules)
        return out
