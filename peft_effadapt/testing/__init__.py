"""Testbed: tiny model factories for unit tests, generated datasets and the bundled small trained checkpoints."""

from .factories import (
    CNN_FAMILIES,
    randomize_batchnorm,
    tiny_clip,
    tiny_clip_config,
    tiny_clip_vision,
    tiny_cnn,
    tiny_pixel_values,
    tiny_resnet,
    tiny_text_inputs,
    tiny_vit,
    tiny_vit_config,
)

__all__ = [
    "CNN_FAMILIES",
    "randomize_batchnorm",
    "tiny_cnn",
    "tiny_resnet",
    "tiny_clip",
    "tiny_clip_config",
    "tiny_clip_vision",
    "tiny_pixel_values",
    "tiny_text_inputs",
    "tiny_vit",
    "tiny_vit_config",
]

# Generated datasets, CoOp-protocol splits, bundled checkpoints (the testbed).
from ..tasks import harmonic_mean  # noqa: E402  (the CoOp protocol's summary number, re-exported)
from .cache import cache_dir  # noqa: E402
from .captions import TEMPLATE, full_caption, random_caption  # noqa: E402
from .checkpoints import (  # noqa: E402
    checkpoint_path,
    load_source_classifier,
    load_tiny_clip,
    load_tiny_resnet,
    load_tiny_vit,
)
from .data import (  # noqa: E402
    CLASSIFICATION_SETS,
    HELD_OUT_PAIRS,
    class_names,
    make_caption_dataset,
    make_classification_dataset,
)
from .domains import make_domain_dataset  # noqa: E402
from .evaluation import (  # noqa: E402
    classifier_accuracy,
    clip_video_retrieval,
    clip_zero_shot_accuracy,
)
from .loading import CLIPWithData, load_clip, load_clip_with_data  # noqa: E402
from .processing import ShapesImageProcessor, ShapesProcessor, dataset_images  # noqa: E402
from .shapes import ShapeSpec, render  # noqa: E402
from .splits import base_novel_split, few_shot_split  # noqa: E402
from .video import make_video_dataset, video_caption  # noqa: E402

__all__ += [
    "CLASSIFICATION_SETS",
    "CLIPWithData",
    "HELD_OUT_PAIRS",
    "TEMPLATE",
    "ShapeSpec",
    "ShapesImageProcessor",
    "ShapesProcessor",
    "base_novel_split",
    "cache_dir",
    "checkpoint_path",
    "class_names",
    "classifier_accuracy",
    "clip_video_retrieval",
    "clip_zero_shot_accuracy",
    "dataset_images",
    "few_shot_split",
    "full_caption",
    "load_clip",
    "load_clip_with_data",
    "harmonic_mean",
    "load_source_classifier",
    "load_tiny_clip",
    "load_tiny_resnet",
    "load_tiny_vit",
    "make_caption_dataset",
    "make_classification_dataset",
    "make_domain_dataset",
    "make_video_dataset",
    "random_caption",
    "render",
    "video_caption",
]
