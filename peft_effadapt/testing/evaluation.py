"""Accuracy and retrieval metrics for the bundled checkpoints on the generated datasets."""

from __future__ import annotations

import numpy as np
import torch
from datasets import Dataset

from ..tasks.classification import projected_features
from .captions import TEMPLATE
from .data import class_names
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
    """Top-1 accuracy of zero-shot CLIP with prompts `template.format(class name)`."""
    model.eval()
    text = clip_text_features(model, processor, [template.format(n) for n in class_names(dataset, label_column)])
    image = clip_image_features(model, processor, dataset_images(dataset))
    pred = (image @ text.T).argmax(-1).numpy()
    return float((pred == np.asarray(dataset[label_column])).mean())


@torch.no_grad()
def clip_video_retrieval(model, processor: ShapesProcessor, videos: Dataset) -> dict[str, float]:
    """Text-to-video retrieval with the mean of per-frame CLIP features: R@1, R@5 and median rank."""
    model.eval()
    frames = np.asarray(videos.with_format("numpy")[:]["frames"], dtype=np.uint8)  # (V, T, H, W, 3)
    v, t = frames.shape[:2]
    per_frame = clip_image_features(model, processor, frames.reshape(v * t, *frames.shape[2:]))
    video = torch.nn.functional.normalize(per_frame.view(v, t, -1).mean(1), dim=-1)
    text = clip_text_features(model, processor, list(videos["caption"]))
    sims = text @ video.T
    # rank of the true video (index i) for caption i; identical captions count as separate queries
    ranks = (sims > sims.diagonal()[:, None]).sum(1).numpy() + 1
    return {"R@1": float((ranks <= 1).mean()), "R@5": float((ranks <= 5).mean()), "MdR": float(np.median(ranks))}


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
