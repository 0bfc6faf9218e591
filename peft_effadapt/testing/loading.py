"""CLIP and an image-classification dataset in one call, for the examples: the bundled tiny CLIP with a generated set
(offline), or a Hub id / local folder of a `CLIPModel` + `CLIPProcessor` with a `datasets` image-classification set."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from torch import nn

from .checkpoints import load_tiny_clip
from .data import make_classification_dataset
from .processing import dataset_images


class CLIPWithData(NamedTuple):
    model: nn.Module
    tokenizer: object
    to_pixel_values: Callable  # images -> pixel_values
    images_of: Callable  # dataset -> images
    train: object
    test: object


def load_clip(model_id: str | None = None) -> tuple[nn.Module, object, Callable, Callable]:
    """(model, tokenizer, images -> pixel_values, dataset -> images). `model_id=None`: the bundled tiny CLIP."""
    if model_id is None:
        clip, processor = load_tiny_clip()
        return clip, processor.tokenizer, processor.image_processor.to_pixel_values, dataset_images
    from transformers import CLIPModel, CLIPProcessor

    clip, processor = CLIPModel.from_pretrained(model_id), CLIPProcessor.from_pretrained(model_id)

    def to_pixel_values(images):
        return processor(images=list(images), return_tensors="pt")["pixel_values"]

    def images_of(dataset):
        return [image.convert("RGB") for image in dataset["image"]]

    return clip, processor.tokenizer, to_pixel_values, images_of


def load_clip_with_data(model_id: str | None, dataset: str) -> CLIPWithData:
    """`load_clip(model_id)` plus the train and test splits of `dataset`: a bundled set name (`shapes`, `clutter`, ...)
    with the bundled CLIP, otherwise a `datasets` id or folder with an `image` and a `label` column."""
    clip, tokenizer, to_pixel_values, images_of = load_clip(model_id)
    if model_id is None:
        train, test = (make_classification_dataset(dataset, split) for split in ("train", "test"))
    else:
        from datasets import load_dataset

        data = load_dataset(dataset)
        train, test = data["train"], data["test"]
    return CLIPWithData(clip, tokenizer, to_pixel_values, images_of, train, test)
