"""The documented real-CLIP route after the README install: `examples/rlp_clip.py --model <folder>` on a
CLIP-ViT-B/16-shaped checkpoint (random weights, real sizes) with a real `CLIPProcessor`, built offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

from peft_effadapt.testing import checkpoint_path, dataset_images, make_classification_dataset

ROOT = Path(__file__).resolve().parents[1]
PIL = pytest.importorskip("PIL.Image")  # a declared dependency: the skip only guards a broken install


def vit_b16_config() -> CLIPConfig:
    """openai/clip-vit-base-patch16's sizes: vision 768 wide, 12 layers, patch 16 at 224; text 512 wide, 12 layers."""
    return CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=8, max_position_embeddings=77),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=224, patch_size=16),
        projection_dim=512,
    )


@pytest.fixture(scope="session")
def vit_b16_folder(tmp_path_factory) -> Path:
    """A saved CLIPModel of ViT-B/16 shape and a CLIPProcessor with CLIP's real 224 preprocessing (its tokenizer
    files are the bundled tiny CLIP's: the ids fit the 49,408-row table)."""
    folder = tmp_path_factory.mktemp("clip-vit-b16")
    torch.manual_seed(0)
    CLIPModel(vit_b16_config()).save_pretrained(folder)
    tokenizer = CLIPTokenizer.from_pretrained(checkpoint_path("tiny_clip"))
    CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer).save_pretrained(folder)
    return folder


def image_folder(root: Path, classes: int = 4, train_per_class: int = 16) -> Path:
    """An `imagefolder` dataset (train/<class>/*.png, test/<class>/*.png) of testbed shapes: what
    `datasets.load_dataset(<folder>)` reads offline, PIL images and a ClassLabel column as from the Hub."""
    for split, per_class in (("train", train_per_class), ("test", 1)):
        data = make_classification_dataset("shapes", split)
        names, labels, images = data.features["label"].names, data["label"], dataset_images(data)
        for c in range(classes):
            target = root / split / names[c]
            target.mkdir(parents=True)
            for i, index in enumerate([j for j, label in enumerate(labels) if label == c][:per_class]):
                PIL.fromarray(images[index]).save(target / f"{i}.png")
    return root


@pytest.mark.slow
def test_rlp_example_runs_on_a_vit_b16_shaped_clip(vit_b16_folder, tmp_path):
    data = image_folder(tmp_path / "data")
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(ROOT / "examples" / "rlp_clip.py"), "--model", str(vit_b16_folder),
           "--dataset", str(data), "--steps", "2", "--output-dir", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "reloaded RLP adapter: identical scores" in result.stdout, result.stdout[-2000:]
    adapter = load_file(out / "rlp" / "adapter_model.safetensors")
    shapes = sorted(tuple(t.shape) for t in adapter.values())
    assert shapes == [(1, 512), (4, 1)], shapes  # A (n x r) and B (r x d): 4 * 1 + 1 * 512 = 516 numbers at d = 512
