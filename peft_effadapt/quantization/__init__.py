"""Quantisation core (pure tensor code, no model or tuner imports): K-means codebook quantiser on z-score-normalised
tensors with a straight-through estimator and constrained adaptive clustering, index bit packing, and the uniform /
Gaussian-noise baselines. Used by QPrompt (`tuners/qprompt`)."""

from .kmeans import assign_nearest, kmeans_1d, quantile_init
from .packing import check_bits, pack_indices, packed_length, payload_bytes, unpack_indices
from .quantizers import (
    REFIT_MODES,
    GaussianNoise,
    Identity,
    KMeansQuantizer,
    Quantized,
    UniformQuantizer,
    normalize,
    straight_through,
)
from .schedule import KL_PER_LEVEL, RefitSchedule, default_kl_threshold, index_histogram, kl_divergence

__all__ = [
    "KL_PER_LEVEL",
    "REFIT_MODES",
    "GaussianNoise",
    "Identity",
    "KMeansQuantizer",
    "Quantized",
    "RefitSchedule",
    "UniformQuantizer",
    "assign_nearest",
    "check_bits",
    "default_kl_threshold",
    "index_histogram",
    "kl_divergence",
    "kmeans_1d",
    "normalize",
    "pack_indices",
    "packed_length",
    "payload_bytes",
    "quantile_init",
    "straight_through",
    "unpack_indices",
]
