"""transformers' zero-shot image-classification pipeline on merged CoOp/RLP adapters, against the adapter's logits."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from transformers import CLIPImageProcessor, CLIPTokenizer, pipeline

from peft_effadapt import CLIPZeroShotClassifier, CoOpConfig, RLPConfig, zero_shot_pipeline_kwargs
from peft_effadapt.testing import checkpoint_path, dataset_images, load_tiny_clip, make_classification_dataset

PIL = pytest.importorskip("PIL.Image")  # a declared dependency: the skip only guards a broken install


def images_and_names(n=6):
    test = make_classification_dataset("shapes", "test").select(range(n))
    return [PIL.fromarray(image) for image in dataset_images(test)], test.features["label"].names


def randomised(model, seed=0):
    """A trained-looking adapter: every adapter parameter moved away from its (zero-shot) init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.5 * torch.randn(param.shape, generator=generator))
    return model.eval()


@pytest.mark.parametrize("config_cls", [RLPConfig, CoOpConfig])
def test_merged_adapter_in_pipeline_matches_adapter_logits(config_cls):
    torch.set_num_threads(1)
    clip, _ = load_tiny_clip()
    tokenizer = CLIPTokenizer.from_pretrained(checkpoint_path("tiny_clip"))
    image_processor = CLIPImageProcessor.from_pretrained(checkpoint_path("tiny_clip"))  # Pillow backend without torchvision
    images, names = images_and_names()
    model = randomised(get_peft_model(clip, config_cls().resolve_tokens(tokenizer)))
    pixel_values = image_processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = CLIPZeroShotClassifier(model, tokenizer, names).eval()(pixel_values).logits.softmax(-1)
        zero_shot = CLIPZeroShotClassifier(load_tiny_clip()[0], tokenizer, names, template="a photo of a {}.").eval()
        assert not torch.allclose(expected, zero_shot(pixel_values).logits.softmax(-1), atol=1e-3)  # adapter matters
    kwargs = zero_shot_pipeline_kwargs(model, tokenizer)
    assert kwargs == {"hypothesis_template": "X X X X {}."}
    classify = pipeline("zero-shot-image-classification", model=model.merge_and_unload(), tokenizer=tokenizer,
                        image_processor=image_processor)
    results = classify(images, candidate_labels=names, **kwargs)
    got = torch.tensor([[next(r["score"] for r in result if r["label"] == name) for name in names]
                        for result in results])
    # two fp32 computations of one softmax (merged tables vs written context rows): a few ulp of values <= 1
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_pipeline_kwargs_refuse_what_cannot_serve():
    tokenizer = CLIPTokenizer.from_pretrained(checkpoint_path("tiny_clip"))
    with pytest.raises(TypeError, match="active CoOp/RLP/QPrompt adapter"):
        zero_shot_pipeline_kwargs(load_tiny_clip()[0])
    with pytest.raises(ValueError, match="csc=True"):
        zero_shot_pipeline_kwargs(CoOpConfig(csc=True, num_classes=3).resolve_tokens(tokenizer))
    wrong = RLPConfig(placeholder_token="X", placeholder_token_id=7).resolve_tokens(tokenizer)
    with pytest.raises(ValueError, match="placeholder id 7"):
        zero_shot_pipeline_kwargs(wrong, tokenizer)


@pytest.mark.parametrize("config_cls", [RLPConfig, CoOpConfig])
def test_context_that_does_not_round_trip_is_refused(config_cls):
    tokenizer = CLIPTokenizer.from_pretrained(checkpoint_path("tiny_clip"))
    with pytest.raises(ValueError, match="does not round-trip"):
        config_cls(ctx_init="a photo of a <|endoftext|>").resolve_tokens(tokenizer)
    with pytest.raises(ValueError, match="placeholder_token"):
        config_cls(placeholder_token="<|endoftext|>").resolve_tokens(tokenizer)
    assert config_cls(ctx_init="a photo of a").resolve_tokens(tokenizer).ctx_init_token_ids == [105, 473, 428, 105]


def test_word_level_tokenizer_that_maps_the_context_to_unk_is_refused():
    """The issue's case: every context word becomes the one unknown id, so P0 would be 4 copies of one row."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "x": 3, "circle": 4, ".": 5}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token="<s>",
                                        eos_token="</s>")
    assert tokenizer("a photo of a", add_special_tokens=False)["input_ids"] == [0, 0, 0, 0]
    with pytest.raises(ValueError, match=r"'a photo of a' does not round-trip .*\[0, 0, 0, 0\]"):
        RLPConfig(ctx_init="a photo of a").resolve_tokens(tokenizer)
    assert RLPConfig(ctx_init="x circle", placeholder_token="x").resolve_tokens(tokenizer).ctx_init_token_ids == [3, 4]
