"""The testbed: generated datasets (determinism, features, bad input) and the bundled checkpoints."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from datasets import ClassLabel
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, CLIPTokenizer

from peft_effadapt.testing import (
    CLASSIFICATION_SETS,
    HELD_OUT_PAIRS,
    base_novel_split,
    checkpoint_path,
    class_names,
    classifier_accuracy,
    clip_zero_shot_accuracy,
    dataset_images,
    few_shot_split,
    harmonic_mean,
    load_source_classifier,
    load_tiny_clip,
    load_tiny_resnet,
    load_tiny_vit,
    make_caption_dataset,
    make_classification_dataset,
    make_domain_dataset,
    make_video_dataset,
)

torch.set_num_threads(1)


def _images(ds):
    return dataset_images(ds)


# ---------------------------------------------------------------- datasets
def test_caption_dataset_is_deterministic_per_seed():
    a = make_caption_dataset(24, seed=0, use_cache=False)
    b = make_caption_dataset(24, seed=0, use_cache=False)
    c = make_caption_dataset(24, seed=1, use_cache=False)
    assert np.array_equal(_images(a), _images(b)) and a["caption"][:] == b["caption"][:]
    assert not np.array_equal(_images(a), _images(c))
    assert isinstance(a.features["shape"], ClassLabel) and a.features["shape"].num_classes == 8
    pairs = {(a.features["shape"].int2str(s), a.features["color"].int2str(k)) for s, k in zip(a["shape"], a["color"])}
    assert not pairs & HELD_OUT_PAIRS


def test_cache_returns_the_same_rows(tmp_path):
    fresh = make_classification_dataset("colors", "test", n_per_class=3, seed=5, use_cache=False)
    first = make_classification_dataset("colors", "test", n_per_class=3, seed=5, cache_dir=tmp_path)
    again = make_classification_dataset("colors", "test", n_per_class=3, seed=5, cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 1
    for ds in (first, again):
        assert np.array_equal(_images(ds), _images(fresh)) and ds["label"][:] == fresh["label"][:]


@pytest.mark.parametrize("name", sorted(CLASSIFICATION_SETS))
def test_classification_sets_have_classlabels_and_balance(name):
    ds = make_classification_dataset(name, "train", n_per_class=3, seed=0, use_cache=False)
    names = CLASSIFICATION_SETS[name].class_names
    assert isinstance(ds.features["label"], ClassLabel) and class_names(ds) == list(names)
    assert np.bincount(ds["label"][:], minlength=len(names)).tolist() == [3] * len(names)
    assert _images(ds).shape == (3 * len(names), 32, 32, 3)
    test = make_classification_dataset(name, "test", n_per_class=3, seed=0, use_cache=False)
    assert not np.array_equal(_images(ds), _images(test))


def test_few_shot_split_is_exact_and_seeded():
    ds = make_classification_dataset("shapes", "train", n_per_class=5, use_cache=False)
    a, b, c = few_shot_split(ds, 2, seed=0), few_shot_split(ds, 2, seed=0), few_shot_split(ds, 2, seed=1)
    assert np.bincount(a["label"][:]).tolist() == [2] * 8
    assert np.array_equal(_images(a), _images(b)) and not np.array_equal(_images(a), _images(c))


def test_base_novel_split_halves_and_relabels():
    ds = make_classification_dataset("objects", "test", n_per_class=2, use_cache=False)
    base, novel = base_novel_split(ds)
    names = class_names(ds)
    assert class_names(base) == names[:8] and class_names(novel) == names[8:]
    assert sorted(set(novel["label"][:])) == list(range(8)) and len(base) + len(novel) == len(ds)
    first_novel = ds.filter(lambda r: r["label"] == 8)
    assert np.array_equal(_images(first_novel), _images(novel.filter(lambda r: r["label"] == 0)))
    assert harmonic_mean(82.69, 63.22) == pytest.approx(71.66, abs=0.01)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: make_classification_dataset("nope"), "unknown classification set"),
        (lambda: make_classification_dataset("shapes", "val"), "split"),
        (lambda: make_classification_dataset("shapes", n_per_class=0, use_cache=False), "n_per_class"),
        (lambda: make_caption_dataset(0, use_cache=False), "n must be"),
        (lambda: make_domain_dataset("elsewhere"), "domain"),
        (lambda: make_video_dataset(4, num_frames=1, use_cache=False), "num_frames"),
        (lambda: few_shot_split(make_classification_dataset("textures", n_per_class=3, use_cache=False), 4),
         "fewer than shots=4"),
        (lambda: few_shot_split(make_classification_dataset("textures", n_per_class=3, use_cache=False), 0), "shots"),
        (lambda: base_novel_split(make_classification_dataset("textures", n_per_class=1, use_cache=False)
                                  .remove_columns("label").add_column("label", [0] * 4,
                                                                      feature=ClassLabel(names=["only"]))),
         "at least 2 classes"),
    ],
)
def test_bad_parameters_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_videos_move_as_captioned():
    videos = make_video_dataset(14, seed=0, use_cache=False)
    again = make_video_dataset(14, seed=0, use_cache=False)
    frames = np.asarray(videos.with_format("numpy")[:]["frames"], dtype=np.float32)
    assert frames.shape == (14, 12, 32, 32, 3)
    assert np.array_equal(frames, np.asarray(again.with_format("numpy")[:]["frames"], dtype=np.float32))
    events = videos.features["event"].names
    for row, caption in enumerate(videos["caption"]):
        event = events[videos[row]["event"]]
        assert caption.endswith(event) or (event == "changes color" and " turns " in caption)
        if event in ("moves left", "moves right"):  # the object's centroid travels the captioned way
            mass = np.abs(frames[row] - np.median(frames[row], axis=0)).sum(-1)  # (T, H, W); background cancels
            x = (mass * np.arange(32)).sum((1, 2)) / mass.sum((1, 2))
            assert (x[-1] - x[0] > 8) if event == "moves right" else (x[0] - x[-1] > 8)


def test_domains_differ_in_style_not_classes():
    src = make_domain_dataset("source", "test", n_per_class=2, use_cache=False)
    tgt = make_domain_dataset("target", "test", n_per_class=2, use_cache=False)
    assert class_names(src) == class_names(tgt)
    assert not set(src["color"][:]) & set(tgt["color"][:])


# ---------------------------------------------------------------- bundled checkpoints
def test_tiny_clip_loads_and_is_zero_shot_accurate():
    model, processor = load_tiny_clip()
    path = checkpoint_path("tiny_clip")
    for loader in (CLIPTokenizer, AutoTokenizer):
        tok = loader.from_pretrained(str(path))
        assert tok.eos_token_id == model.config.text_config.eos_token_id != 2  # first-EOS pooling
        assert tok.bos_token_id == model.config.text_config.bos_token_id
    ids = processor.tokenizer("x x x x red circle.")["input_ids"]
    assert len(ids) == 9 and processor.tokenizer.eos_token_id not in ids[1:-1]
    ds = make_classification_dataset("colors", "test", n_per_class=8, use_cache=False)
    assert clip_zero_shot_accuracy(model, processor, ds) >= 0.6  # chance 0.125
    cfg = json.loads((path / "preprocessor_config.json").read_text())
    assert cfg["image_processor_type"] == "CLIPImageProcessor"


def test_tiny_vit_and_resnet_beat_chance():
    vit, processor = load_tiny_vit()
    assert vit.config.image_size == 32 and vit.config.num_labels == 8
    assert classifier_accuracy(vit, make_classification_dataset("shapes", "test", n_per_class=8, use_cache=False),
                               processor) >= 0.3  # chance 0.125; the ViT is the weakest checkpoint (~0.43)
    resnet, processor = load_tiny_resnet()
    assert resnet.config.layer_type == "bottleneck"
    src = make_domain_dataset("source", "test", n_per_class=8, use_cache=False)
    assert classifier_accuracy(resnet, src, processor) >= 0.6
    source_model, _ = load_source_classifier()
    assert type(source_model) is type(resnet)


def test_missing_or_damaged_checkpoint_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        load_tiny_vit(tmp_path / "does_not_exist")
    broken = tmp_path / "broken_vit"
    shutil.copytree(checkpoint_path("tiny_vit"), broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="broken_vit"):
        load_tiny_vit(broken)
    partial = tmp_path / "partial_vit"
    shutil.copytree(checkpoint_path("tiny_vit"), partial)
    weights = load_file(str(partial / "model.safetensors"))
    weights.pop("classifier.weight")
    save_file(weights, str(partial / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="partial_vit.*classifier.weight"):
        load_tiny_vit(partial)
    (partial / "preprocessor_config.json").unlink()
    with pytest.raises(ValueError, match="preprocessor_config.json"):
        load_tiny_vit(partial)
    with pytest.raises(ValueError, match="CLIPModel"):
        load_tiny_clip(_as_clip_dir(tmp_path))


def _as_clip_dir(tmp_path):
    """A directory with ViT weights under CLIP's file names: must not load as a CLIP."""
    fake = tmp_path / "fake_clip"
    shutil.copytree(checkpoint_path("tiny_vit"), fake)
    shutil.copy(checkpoint_path("tiny_clip") / "tokenizer.json", fake / "tokenizer.json")
    return fake


def test_checkpoints_fit_the_size_budget():
    total = sum(f.stat().st_size for f in checkpoint_path("").rglob("*") if f.is_file())
    assert total <= 40 * 1024 * 1024
