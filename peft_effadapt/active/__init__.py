"""LFTL (ECCV 2024): source-free active domain adaptation by contrastive sampling and visual persistence.

Pool of unlabelled target data -> sampler scores with current and previous predictions -> oracle labels the
queried rows -> VPA training round (a `Trainer`) -> state (labels, memory, round, weights) saved -> next round.

One method, four roles (the names of the LFTL spec): `LFTLConfig` holds every hyper-parameter of the method;
`ContrastiveActiveSampler` picks the rows to label each round; `VPATrainer` is the `transformers.Trainer` of one
round (visual persistence adaptation loss, anchor memory); `ActiveAdaptationLoop` runs the rounds (query, label,
train, save, resume) with a config, a sampler and a fresh `VPATrainer` per round.
"""

from .budget import budget_schedule
from .config import LFTLConfig
from .features import FeatureCapture, default_preprocess, predict
from .images import ImagePreprocess
from .loop import ActiveAdaptationLoop
from .losses import anchor_entropy, entropy, information_maximization, soft_cross_entropy, vpa_loss
from .memory import AnchorMemory
from .metrics import classification_metrics
from .oracle import DatasetOracle
from .samplers import (
    SAMPLERS,
    ActiveSampler,
    ContrastiveActiveSampler,
    EntropySampler,
    MarginSampler,
    RandomSampler,
    Selection,
    top2_margin,
)
from .trainer import AnchorMemoryCallback, LabelledMixupCallback, PairedStepSampler, VPATrainer

__all__ = [
    "SAMPLERS",
    "ActiveAdaptationLoop",
    "ActiveSampler",
    "AnchorMemory",
    "AnchorMemoryCallback",
    "ContrastiveActiveSampler",
    "DatasetOracle",
    "EntropySampler",
    "FeatureCapture",
    "ImagePreprocess",
    "LFTLConfig",
    "LabelledMixupCallback",
    "MarginSampler",
    "PairedStepSampler",
    "RandomSampler",
    "Selection",
    "VPATrainer",
    "anchor_entropy",
    "budget_schedule",
    "classification_metrics",
    "default_preprocess",
    "entropy",
    "information_maximization",
    "predict",
    "soft_cross_entropy",
    "top2_margin",
    "vpa_loss",
]
