"""Image preprocessing for the testbed's 32x32 arrays, with no PIL or torchvision.

The checkpoints also carry a standard `preprocessor_config.json` (so `CLIPProcessor` / `AutoImageProcessor` load
them where PIL or torchvision is installed); this module applies exactly the same arithmetic: rescale by 1/255,
then normalise with the config's mean and std. No resize or crop is needed for 32x32 inputs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from transformers import BatchEncoding

from .shapes import IMAGE_SIZE

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
CONFIG_NAME = "preprocessor_config.json"


def dataset_images(dataset: Dataset, column: str = "image") -> np.ndarray:
    """All images of a dataset as one uint8 array (N, 32, 32, 3)."""
    return np.asarray(dataset.with_format("numpy")[:][column], dtype=np.uint8)


class ShapesImageProcessor:
    """Turns uint8 HWC images (array, list of arrays, or tensor) into normalised `pixel_values` (N, 3, H, W)."""

    def __init__(self, image_mean=MEAN, image_std=STD, rescale_factor: float = 1 / 255, size: int = IMAGE_SIZE):
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self.rescale_factor, self.size = rescale_factor, size

    def __call__(self, images, return_tensors: str = "pt") -> BatchEncoding:
        return BatchEncoding({"pixel_values": self.to_pixel_values(images)}, tensor_type=None)

    def to_pixel_values(self, images) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(images, dtype=np.float32) if not torch.is_tensor(images) else images)
        if x.ndim == 3:
            x = x[None]
        if x.ndim < 4 or x.shape[-1] != 3 or x.shape[-3:-1] != (self.size, self.size):
            raise ValueError(f"expected uint8 images shaped (..., {self.size}, {self.size}, 3), got {tuple(x.shape)}")
        x = x.float() * self.rescale_factor
        x = (x - torch.tensor(self.image_mean)) / torch.tensor(self.image_std)
        return x.movedim(-1, -3).contiguous()

    def to_dict(self, processor_type: str = "CLIPImageProcessor") -> dict:
        return {
            "image_processor_type": processor_type,
            "do_resize": True, "size": {"height": self.size, "width": self.size}, "resample": 3,
            "do_center_crop": False, "crop_size": {"height": self.size, "width": self.size},
            "do_rescale": True, "rescale_factor": self.rescale_factor,
            "do_normalize": True, "image_mean": list(self.image_mean), "image_std": list(self.image_std),
            "do_convert_rgb": True,
        }

    def save_pretrained(self, path: str | os.PathLike, processor_type: str = "CLIPImageProcessor") -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / CONFIG_NAME).write_text(json.dumps(self.to_dict(processor_type), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> ShapesImageProcessor:
        file = Path(path) / CONFIG_NAME
        try:
            cfg = json.loads(file.read_text())
            size = cfg.get("size", {}).get("height", IMAGE_SIZE)
            return cls(cfg["image_mean"], cfg["image_std"], cfg.get("rescale_factor", 1 / 255), size)
        except (OSError, ValueError, KeyError, AttributeError) as err:
            raise ValueError(f"cannot read image processor config {file}: {err}") from err


class ShapesProcessor:
    """A `CLIPProcessor` look-alike: `processor(text=..., images=..., padding=True)` -> input_ids,
    attention_mask, pixel_values as torch tensors."""

    def __init__(self, tokenizer, image_processor: ShapesImageProcessor):
        self.tokenizer, self.image_processor = tokenizer, image_processor

    def __call__(self, text=None, images=None, padding=True, return_tensors: str = "pt", **kwargs) -> BatchEncoding:
        if text is None and images is None:
            raise ValueError("ShapesProcessor needs text, images or both")
        out = {}
        if text is not None:
            out.update(self.tokenizer(text, padding=padding, return_tensors="pt", **kwargs))
        if images is not None:
            out["pixel_values"] = self.image_processor.to_pixel_values(images)
        return BatchEncoding(out)
