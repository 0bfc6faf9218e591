"""CLIPZeroShotClassifier, the base-to-novel evaluation helper, and prompt methods under Trainer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Sequence, Value
from peft import get_peft_model
from transformers import CLIPModel, Trainer, TrainingArguments

from peft_effadapt import CLIPZeroShotClassifier, CoOpConfig, RLPConfig
from peft_effadapt.tasks import average_base_to_novel, evaluate_base_to_novel, harmonic_mean
from peft_effadapt.testing import tiny_clip, tiny_pixel_values, tiny_vit

CTX = [10, 11, 12, 13]
CLASSES = [[20, 5], [21, 22, 5], [23, 5]]
SPECIAL = (1, 2, 0)


def classifier(model, classes=CLASSES):
    return CLIPZeroShotClassifier(model, class_token_ids=classes, template_token_ids=CTX, special_token_ids=SPECIAL)


def manual_zero_shot(clip, pixels, classes=CLASSES):
    rows = [[1] + CTX + c + [2] for c in classes]
    ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    return clip(input_ids=ids, pixel_values=pixels).logits_per_image


def test_plain_clip_matches_clip_logits():
    pixels = tiny_pixel_values(4)
    clip = tiny_clip()
    torch.testing.assert_close(classifier(clip)(pixels).logits, manual_zero_shot(clip, pixels), rtol=1e-5, atol=1e-5)


def test_subclass_of_clip_model_is_accepted_and_other_models_are_refused():
    class UserCLIPModel(CLIPModel):
        pass

    pixels, clip = tiny_pixel_values(4), tiny_clip()
    user = UserCLIPModel(clip.config).eval()
    user.load_state_dict(clip.state_dict())
    torch.testing.assert_close(classifier(user)(pixels).logits, classifier(clip)(pixels).logits, rtol=0, atol=0)
    with pytest.raises(TypeError, match="CLIPZeroShotClassifier needs a CLIPModel or a subclass"):
        classifier(tiny_vit())


@pytest.mark.parametrize("config_cls", [RLPConfig, CoOpConfig])
def test_prompt_adapter_at_init_equals_zero_shot(config_cls):
    pixels = tiny_pixel_values(4)
    model = get_peft_model(tiny_clip(), config_cls(ctx_init_token_ids=CTX, placeholder_token_id=7))
    clf = classifier(model).eval()
    assert (clf.prompts().input_ids[:, 1:5] == 7).all()
    torch.testing.assert_close(clf(pixels).logits, manual_zero_shot(tiny_clip(), pixels), rtol=1e-5, atol=1e-5)
    with model.disable_adapter():
        assert (clf.prompts().input_ids[:, 1:5] == torch.tensor(CTX)).all()


def test_text_features_are_cached_in_eval_and_invalidated():
    model = get_peft_model(tiny_clip(), RLPConfig(ctx_init_token_ids=CTX, placeholder_token_id=7))
    clf = classifier(model).eval()
    first = clf.text_features()
    assert clf.text_features() is first
    layer = model.base_model.prompt_layer()
    with torch.no_grad():
        layer.rlp_A["default"].add_(0.5)  # an optimizer step is an in-place update
    second = clf.text_features()
    assert second is not first and not torch.allclose(second, first)
    model.merge_adapter()
    merged = clf.text_features()
    assert merged is not second
    clf.set_class_names(class_token_ids=CLASSES[:2])
    assert clf.text_features().shape[0] == 2
    clf.train()
    assert clf.text_features() is not clf.text_features()


def test_class_specific_adapter_refuses_other_class_sets():
    model = get_peft_model(tiny_clip(), CoOpConfig(ctx_init_token_ids=CTX, placeholder_token_id=7, csc=True,
                                                   num_classes=3))
    clf = classifier(model)
    with pytest.raises(ValueError, match="novel"):
        clf.set_class_names(class_token_ids=CLASSES[:2])


def test_class_name_that_does_not_fit_raises_naming_it():
    clf = classifier(tiny_clip())
    with pytest.raises(ValueError, match="huge"):
        clf.set_class_names(["ok", "huge"], class_token_ids=[[20], [21] * 20])


def test_harmonic_mean_and_average_row():
    assert round(harmonic_mean(82.69, 63.22), 2) == 71.66
    avg = average_base_to_novel([{"base": 80.0, "novel": 60.0}, {"base": 90.0, "novel": 70.0}])
    assert avg["base"] == 85.0 and avg["novel"] == 65.0 and avg["hm"] == pytest.approx(harmonic_mean(85, 65))


def _image_dataset(names, n, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(names), n)
    feats = Features({"image": Sequence(Sequence(Sequence(Value("uint8")))), "label": ClassLabel(names=names)})
    images = rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)
    return Dataset.from_dict({"image": images.tolist(), "label": labels.tolist()}, features=feats)


def test_evaluate_base_to_novel_uses_each_half_names(tmp_path):
    from peft_effadapt.testing.tokenizer import train_caption_tokenizer

    tok = train_caption_tokenizer(tmp_path)
    model = get_peft_model(tiny_clip(text_config=dict(vocab_size=len(tok), max_position_embeddings=16,
                                                      bos_token_id=0, eos_token_id=1, pad_token_id=1)),
                           RLPConfig().resolve_tokens(tok))
    clf = CLIPZeroShotClassifier(model, tok)
    base, novel = _image_dataset(["red", "blue"], 12, 0), _image_dataset(["green", "black", "white"], 9, 1)

    def to_pixels(images):
        return torch.as_tensor(np.asarray(images, dtype=np.float32) / 127.5 - 1).permute(0, 3, 1, 2)

    result = evaluate_base_to_novel(clf, base, novel, to_pixels)
    assert set(result) == {"base", "novel", "hm"}
    assert clf.class_names == ["green", "black", "white"]
    assert result["hm"] == pytest.approx(harmonic_mean(result["base"], result["novel"]))


@pytest.mark.parametrize("config_cls", [RLPConfig, CoOpConfig])
def test_trainer_fits_prompt_adapter(config_cls, tmp_path):
    """Images whose colour channel picks the class: the adapter alone must learn to separate them."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 96)
    pixels = rng.normal(0, 1, (96, 3, 32, 32)).astype(np.float32)
    pixels[np.arange(96), labels] += 1.5
    data = Dataset.from_dict({"pixel_values": pixels, "labels": labels}).with_format("torch")
    kwargs = dict(lowrank_dropout=0.0, rank=2) if config_cls is RLPConfig else {}
    model = get_peft_model(tiny_clip(), config_cls(ctx_init_token_ids=CTX, placeholder_token_id=7, **kwargs))
    clf = classifier(model)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=40, per_device_train_batch_size=32,
                             learning_rate=0.05, report_to=[], save_strategy="no", use_cpu=True, seed=0,
                             dataloader_num_workers=0, logging_steps=40)

    def accuracy(prediction):
        return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

    trainer = Trainer(model=clf, args=args, train_dataset=data, eval_dataset=data, compute_metrics=accuracy)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_loss"] < before["eval_loss"] - 0.05, (before, after)
    assert all(not p.requires_grad for n, p in model.named_parameters() if model.base_model.prefix not in n)
