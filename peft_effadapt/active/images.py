"""Image batches -> `pixel_values` for the loop: any image processor, optional random horizontal flips."""

from __future__ import annotations

import numpy as np
import torch


class ImagePreprocess:
    """Maps a numpy batch with an image column to `{"pixel_values": ...}` via `image_processor`.

    Args:
        image_processor: A transformers image processor (`processor(images, return_tensors="pt")`) or anything with
            `to_pixel_values(images)`.
        column (str): The image column of the batch.
        hflip (bool): Flip each image left-right with probability 1/2 (torch's global generator, which the loop
            seeds per round): the train-time augmentation used by the testbed.
    """

    def __init__(self, image_processor, column: str = "image", hflip: bool = False):
        self.image_processor, self.column, self.hflip = image_processor, column, hflip

    def __call__(self, batch: dict) -> dict:
        if self.column not in batch:
            raise ValueError(f"the batch has no image column {self.column!r} (columns: {sorted(batch)}).")
        images = np.asarray(batch[self.column])
        if hasattr(self.image_processor, "to_pixel_values"):
            pixels = self.image_processor.to_pixel_values(images)
        else:
            pixels = self.image_processor(list(images), return_tensors="pt")["pixel_values"]
        if self.hflip:
            flip = torch.rand(pixels.shape[0]) < 0.5
            pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
        return {"pixel_values": pixels}
