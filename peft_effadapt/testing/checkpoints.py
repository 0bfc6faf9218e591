"""Loaders for the small trained checkpoints bundled under `peft_effadapt/testing/checkpoints/`."""

from __future__ import annotations

import os
from pathlib import Path

from transformers import (
    CLIPModel,
    CLIPTokenizer,
    PreTrainedModel,
    ResNetForImageClassification,
    ViTForImageClassification,
)

from .processing import ShapesImageProcessor, ShapesProcessor
from .quiet import no_progress_bars

CHECKPOINT_ROOT = Path(__file__).resolve().parent / "checkpoints"
_REQUIRED = ("config.json", "model.safetensors", "preprocessor_config.json")


def checkpoint_path(name: str) -> Path:
    """Directory of a bundled checkpoint: 'tiny_clip', 'tiny_vit' or 'tiny_resnet'."""
    return CHECKPOINT_ROOT / name


def _check_dir(path: str | os.PathLike, extra: tuple[str, ...] = ()) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist (expected one made by "
                                f"benchmarks/testbed/train_*.py)")
    missing = [f for f in _REQUIRED + extra if not (path / f).is_file()]
    if missing:
        raise ValueError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    return path


def _load(cls: type[PreTrainedModel], path: Path) -> PreTrainedModel:
    try:
        with no_progress_bars():
            model, info = cls.from_pretrained(str(path), output_loading_info=True)
    except Exception as err:  # noqa: BLE001 - transformers raises many types for a damaged file
        raise ValueError(f"checkpoint {path} could not be loaded as {cls.__name__}: {err}") from err
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "mismatched_keys") and v}
    if bad:  # from_pretrained would silently re-initialise these weights at random
        raise ValueError(f"checkpoint {path} does not match {cls.__name__}: {bad}")
    return model.eval()


def load_tiny_clip(path: str | os.PathLike | None = None) -> tuple[CLIPModel, ShapesProcessor]:
    """The tiny CLIP pretrained on captioned shapes and a processor: `processor(text=..., images=...)` gives
    input_ids, attention_mask and pixel_values (uint8 32x32 images in)."""
    path = _check_dir(path or checkpoint_path("tiny_clip"), ("tokenizer.json",))
    model = _load(CLIPModel, path)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(path))
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"tokenizer files in {path} could not be loaded: {err}") from err
    return model, ShapesProcessor(tokenizer, ShapesImageProcessor.from_pretrained(path))


def load_tiny_vit(path: str | os.PathLike | None = None) -> tuple[ViTForImageClassification, ShapesImageProcessor]:
    """The tiny ViT (patch 4, 65 tokens) trained to classify the 8 shapes, and its image processor."""
    path = _check_dir(path or checkpoint_path("tiny_vit"))
    return _load(ViTForImageClassification, path), ShapesImageProcessor.from_pretrained(path)


def load_tiny_resnet(path: str | os.PathLike | None = None) -> tuple[ResNetForImageClassification,
                                                                    ShapesImageProcessor]:
    """The tiny bottleneck ResNet trained on the source domain of the domain-adaptation task."""
    path = _check_dir(path or checkpoint_path("tiny_resnet"))
    return _load(ResNetForImageClassification, path), ShapesImageProcessor.from_pretrained(path)


def load_source_classifier(path: str | os.PathLike | None = None) -> tuple[ResNetForImageClassification,
                                                                          ShapesImageProcessor]:
    """Source model for domain adaptation (`make_domain_dataset('source' | 'target')`): the tiny ResNet."""
    return load_tiny_resnet(path)
