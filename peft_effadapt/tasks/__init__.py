"""Task wrappers users call: CLIP (and SigLIP) zero-shot / prompt-learned classification and the CoOp evaluation protocol."""

from .classification import (
    CLIPClassifierOutput,
    CLIPZeroShotClassifier,
    accuracy,
    average_base_to_novel,
    dataset_accuracy,
    evaluate_base_to_novel,
    harmonic_mean,
    sigmoid_loss,
)
from .pipeline import zero_shot_pipeline_kwargs
from .retrieval import (
    CLIPVideoRetrieval,
    VideoRetrievalOutput,
    encode_video_dataset,
    retrieval_metrics,
    stack_videos,
    symmetric_infonce,
)

__all__ = [
    "CLIPClassifierOutput",
    "CLIPZeroShotClassifier",
    "accuracy",
    "average_base_to_novel",
    "dataset_accuracy",
    "evaluate_base_to_novel",
    "harmonic_mean",
    "sigmoid_loss",
    "CLIPVideoRetrieval",
    "VideoRetrievalOutput",
    "encode_video_dataset",
    "retrieval_metrics",
    "stack_videos",
    "symmetric_infonce",
    "zero_shot_pipeline_kwargs",
]
