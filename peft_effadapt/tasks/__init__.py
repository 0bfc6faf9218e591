"""Task wrappers users call: CLIP zero-shot / prompt-learned classification and the CoOp evaluation protocol."""

from .classification import (
    CLIPClassifierOutput,
    CLIPZeroShotClassifier,
    accuracy,
    average_base_to_novel,
    dataset_accuracy,
    evaluate_base_to_novel,
    harmonic_mean,
)

__all__ = [
    "CLIPClassifierOutput",
    "CLIPZeroShotClassifier",
    "accuracy",
    "average_base_to_novel",
    "dataset_accuracy",
    "evaluate_base_to_novel",
    "harmonic_mean",
]
