"""The shared CLIP text-prompt core: placement, row selection, prompt ids, merge into the position embeddings."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from transformers import CLIPModel, CLIPTextModel

from peft_effadapt import CoOpConfig, RLPConfig
from peft_effadapt.prompting import (
    PromptSlots,
    find_text_embeddings,
    placeholder_prompt_ids,
    prompt_rows,
    template_prompt_ids,
    write_context,
)
from peft_effadapt.testing import tiny_clip, tiny_pixel_values, tiny_vit
from peft_effadapt.testing.tokenizer import train_caption_tokenizer

from fp32 import assert_fp32_close

SLOTS = PromptSlots(n_ctx=2, placeholder_id=7)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_caption_tokenizer(tmp_path_factory.mktemp("tok"))


def test_prompt_rows_needs_every_slot_to_hold_the_placeholder():
    ids = torch.tensor([[1, 7, 7, 9, 2], [1, 7, 9, 7, 2], [1, 9, 7, 7, 2], [1, 7, 2, 0, 0]])
    assert prompt_rows(ids, SLOTS).tolist() == [True, False, False, False]
    assert prompt_rows(ids[:, :2], SLOTS).tolist() == [False] * 4


def test_write_context_replaces_positions_1_to_n_only():
    ids = torch.tensor([[1, 7, 7, 9, 2], [1, 9, 9, 9, 2]])
    embeds = torch.randn(2, 5, 3)
    ctx = torch.randn(2, 3)
    out = write_context(embeds, ids, ctx, SLOTS)
    assert torch.equal(out[0, 1:3], ctx)
    assert torch.equal(out[0, [0, 3, 4]], embeds[0, [0, 3, 4]])
    assert torch.equal(out[1], embeds[1])


def test_write_context_class_specific_needs_the_class_batch():
    slots = PromptSlots(n_ctx=2, placeholder_id=7, num_classes=2)
    ids = torch.tensor([[1, 7, 7, 9, 2], [1, 7, 7, 8, 2]])
    ctx = torch.randn(2, 2, 3)
    out = write_context(torch.randn(2, 5, 3), ids, ctx, slots)
    assert torch.equal(out[:, 1:3], ctx)
    with pytest.raises(ValueError, match="class prompts in class order"):
        write_context(torch.randn(3, 5, 3), torch.cat([ids, ids[:1]]), ctx, slots)


def test_placeholder_ids_put_context_after_bos(tokenizer):
    batch = placeholder_prompt_ids(["red circle", "blue square"], 4, 314, tokenizer=tokenizer)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert batch.input_ids[:, 0].tolist() == [bos, bos]
    assert (batch.input_ids[:, 1:5] == 314).all()
    for row, mask in zip(batch.input_ids, batch.attention_mask):
        assert row[int(mask.sum()) - 1] == eos


def test_placeholder_ids_match_template_ids_outside_the_context(tokenizer):
    names = ["red circle", "small green star"]
    placeholder = placeholder_prompt_ids(names, 4, 314, tokenizer=tokenizer)
    template = template_prompt_ids(names, "a photo of a {}.", tokenizer)
    ctx = tokenizer("a photo of a", add_special_tokens=False)["input_ids"]
    expected = placeholder.input_ids.clone()
    expected[:, 1:5] = torch.tensor(ctx)
    assert torch.equal(expected, template.input_ids)


def test_class_name_that_does_not_fit_is_named(tokenizer):
    with pytest.raises(ValueError, match="very long"):
        placeholder_prompt_ids(["cat", "very long " * 40], 4, 314, tokenizer=tokenizer, max_length=77)


def test_find_text_embeddings_for_clip_and_text_model():
    config = CoOpConfig(ctx_init_token_ids=[10, 11], placeholder_token_id=7)
    assert find_text_embeddings(tiny_clip(), config, "CoOp")[0] == "text_model.embeddings"
    text_model = CLIPTextModel(tiny_clip().config.text_config)
    assert find_text_embeddings(text_model, config, "CoOp")[0] == "embeddings"


def test_clip_text_model_is_supported():
    torch.manual_seed(0)
    text_model = CLIPTextModel(tiny_clip().config.text_config).eval()
    model = get_peft_model(text_model, RLPConfig(ctx_init_token_ids=[10, 11, 12, 13], placeholder_token_id=7))
    ids = torch.tensor([[1, 7, 7, 7, 7, 20, 5, 2]])
    ref = torch.tensor([[1, 10, 11, 12, 13, 20, 5, 2]])
    assert_fp32_close(model(input_ids=ids).pooler_output, text_model(input_ids=ref).pooler_output)


def test_subclass_of_clip_model_is_accepted_and_a_vision_model_is_refused_by_family():
    class UserCLIPModel(CLIPModel):
        pass

    config = CoOpConfig(ctx_init_token_ids=[10, 11], placeholder_token_id=7)
    assert find_text_embeddings(UserCLIPModel(tiny_clip().config), config, "CoOp")[0] == "text_model.embeddings"
    with pytest.raises(ValueError, match="CLIPModel, CLIPTextModel or CLIPTextModelWithProjection"):
        find_text_embeddings(tiny_vit(), config, "CoOp")


@pytest.mark.parametrize("config_cls", [CoOpConfig, RLPConfig])
def test_merge_writes_only_position_rows_1_to_n_and_unmerge_restores_exactly(config_cls):
    model = get_peft_model(tiny_clip(), config_cls(ctx_init_token_ids=[10, 11, 12, 13], placeholder_token_id=7,
                                                   init_weights=False))
    emb = model.base_model.model.text_model.embeddings
    before = emb.position_embedding.weight.detach().clone()
    ids = torch.tensor([[1, 7, 7, 7, 7, 20, 5, 2]])
    px = tiny_pixel_values(1)
    expected = model(input_ids=ids, pixel_values=px).logits_per_image
    model.merge_adapter()
    after = emb.position_embedding.weight.detach()
    changed = (after != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == [1, 2, 3, 4]
    assert_fp32_close(model(input_ids=ids, pixel_values=px).logits_per_image, expected)
    model.unmerge_adapter()
    assert torch.equal(emb.position_embedding.weight, before)
