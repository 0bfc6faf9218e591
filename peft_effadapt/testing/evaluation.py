"""Accuracy and retrieval metrics for the bundled checkpoints on the generated datasets."""

from __future__ import annotations

import numpy as np
import torch
from datasets import Dataset

from ..tasks.classification import CLIPZeroShotClassifier, dataset_accuracy, projected_features
from ..tasks.retrieval import CLIPVideoRetrieval, encode_video_dataset
from .captions import TEMPLATE
from .processing import ShapesImageProcessor, ShapesProcessor, dataset_images


@torch.no_grad()
def clip_text_features(model, processor: ShapesProcessor, texts: list[str]) -> torch.Tensor:
    inputs = processor(text=texts, padding=True)
    feats = projected_features(model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]))
    return torch.nn.functional.normalize(feats, dim=-1)


@torch.no_grad()
def clip_image_features(model, processor: ShapesProcessor, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    out = []
    for start in range(0, len(images), batch_size):
        pixels = processor(images=images[start:start + batch_size])["pixel_values"]
        out.append(projected_features(model.get_image_features(pixel_values=pixels)))
    return torch.nn.functional.normalize(torch.cat(out), dim=-1)


@torch.no_grad()
def clip_zero_shot_accuracy(model, processor: ShapesProcessor, dataset: Dataset, template: str = TEMPLATE,
                            label_column: str = "label") -> float:
    """Top-1 accuracy (fraction) of zero-shot CLIP with prompts `template.format(class name)`: the task wrapper
    `CLIPZeroShotClassifier` on the dataset's own class names."""
    classifier = CLIPZeroShotClassifier(model, processor.tokenizer, template=template).eval()
    return dataset_accuracy(classifier, dataset, processor.image_processor.to_pixel_values,
                            label_column=label_column) / 100


@torch.no_grad()
def clip_video_retrieval(model, processor: ShapesProcessor, videos: Dataset) -> dict[str, float]:
    """Text-to-video retrieval with meanP (mean of per-frame CLIP features, `tasks.CLIPVideoRetrieval`): R@1, R@5
    (fractions) and median rank."""
    metrics = CLIPVideoRetrieval(model).evaluate(**encode_video_dataset(videos, processor))
    return {"R@1": metrics["t2v_R@1"] / 100, "R@5": metrics["t2v_R@5"] / 100, "MdR": metrics["t2v_MdR"]}


@torch.no_grad()
def classifier_accuracy(model, dataset: Dataset, image_processor: ShapesImageProcessor | None = None,
                        batch_size: int = 256, label_column: str = "label") -> float:
    """Top-1 accuracy of an image classifier (`model(pixel_values).logits`)."""
    model.eval()
    image_processor = image_processor or ShapesImageProcessor()
    images = dataset_images(dataset)
    preds = []
    for start in range(0, len(images), batch_size):
        pixels = image_processor.to_pixel_values(images[start:start + batch_size])
        preds.append(model(pixel_values=pixels).logits.argmax(-1))
    return float((torch.cat(preds).numpy() == np.asarray(dataset[label_column])).mean())
