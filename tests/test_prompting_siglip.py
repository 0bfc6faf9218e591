"""The prompt methods (CoOp, RLP, QPrompt) on a `SiglipModel`: SigLIP's prompt layout (no BOS, context from position
0, padded to max_length), the classifier on SigLIP's own head (exp(scale) * cos + bias, sigmoid loss), exactness at
init, merge, reload and storage as on CLIP; CoCoOp and MaPLe refused with their reason."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, SiglipModel

from peft_effadapt import CLIPZeroShotClassifier, CoCoOpConfig, CoOpConfig, MaPLeConfig, QPromptConfig, RLPConfig
from peft_effadapt.prompting import SIGLIP_TEXT, placeholder_prompt_ids, template_prompt_ids
from peft_effadapt.tasks.classification import sigmoid_loss
from peft_effadapt.testing import tiny_clip, tiny_pixel_values

from fp32 import assert_fp32_close
from siglip_models import (
    CLASS_IDS,
    CTX_IDS,
    EOS,
    MAX_LENGTH,
    PAD,
    PLACEHOLDER_ID,
    placeholder_inputs,
    prompt_kwargs,
    siglip_rows,
    tiny_siglip,
    zero_shot_inputs,
)

CONFIGS = {
    "coop": lambda **kw: CoOpConfig(**prompt_kwargs(), **kw),
    "rlp": lambda **kw: RLPConfig(rank=1, lowrank_dropout=0.0, **prompt_kwargs(), **kw),
    "qprompt-coop": lambda **kw: QPromptConfig(host="coop", bits=1, **prompt_kwargs(), **kw),
    "qprompt-rlp": lambda **kw: QPromptConfig(host="rlp", bits=2, rlp_rank=1, rlp_dropout=0.0, **prompt_kwargs(),
                                              **kw),
}
EXACT_AT_INIT = ["coop", "rlp"]  # CoOp from ctx_init, RLP with A = 0 (QPrompt quantises its start)
methods = pytest.mark.parametrize("method", list(CONFIGS))


def classifier(model) -> CLIPZeroShotClassifier:
    return CLIPZeroShotClassifier(model, class_token_ids=CLASS_IDS, template_token_ids=CTX_IDS,
                                  special_token_ids=(None, EOS, PAD))


def adapted(method: str, **kw):
    return get_peft_model(tiny_siglip(), CONFIGS[method](**kw)).eval()


def test_prompts_follow_siglips_layout():
    zero_shot = classifier(tiny_siglip()).prompts()
    torch.testing.assert_close(zero_shot.input_ids, siglip_rows([CTX_IDS + ids for ids in CLASS_IDS]), rtol=0, atol=0)
    assert bool((zero_shot.attention_mask == 1).all())  # SigLIP attends every position, padding included
    placeholder = classifier(adapted("coop")).prompts()
    torch.testing.assert_close(placeholder.input_ids, placeholder_inputs()["input_ids"], rtol=0, atol=0)


def test_tokenizer_path_builds_the_same_rows():
    """A SigLIP-like tokenizer (EOS `</s>`, no BOS): the helpers give "X X X X {class}. </s>" padded to max_length,
    and the config resolves its token ids from it."""
    vocab = {"<pad>": 0, "<unk>": 3, "</s>": EOS, ".": 5, "X": PLACEHOLDER_ID, "a": 10, "photo": 11, "of": 12,
             "cat": 20, "red": 21, "car": 22}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>", pad_token="</s>", unk_token="<unk>")
    names = ["cat", "red car"]
    rows = placeholder_prompt_ids(names, 4, PLACEHOLDER_ID, tokenizer=tok, max_length=MAX_LENGTH, family=SIGLIP_TEXT)
    expected = siglip_rows([[PLACEHOLDER_ID] * 4 + [20, 5], [PLACEHOLDER_ID] * 4 + [21, 22, 5]])
    torch.testing.assert_close(rows.input_ids, expected, rtol=0, atol=0)
    zero_shot = template_prompt_ids(names, "a photo of a {}.", tok, MAX_LENGTH, SIGLIP_TEXT)
    torch.testing.assert_close(zero_shot.input_ids, siglip_rows([[10, 11, 12, 10, 20, 5], [10, 11, 12, 10, 21, 22, 5]]),
                               rtol=0, atol=0)
    config = CoOpConfig().resolve_tokens(tok)
    assert (config.ctx_init_token_ids, config.placeholder_token_id) == ([10, 11, 12, 10], PLACEHOLDER_ID)


def test_context_start_is_derived_stored_and_clip_unchanged(tmp_path):
    model = adapted("coop")
    assert model.peft_config["default"].context_start == 0
    layer = model.base_model.prompt_layer()
    assert layer.slots("default").positions == slice(0, 4)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["context_start"] == 0
    clip = get_peft_model(tiny_clip(), CONFIGS["coop"]())
    assert clip.peft_config["default"].context_start is None  # CLIP: after BOS, as adapters saved before SigLIP
    assert clip.base_model.prompt_layer().slots("default").positions == slice(1, 5)


@pytest.mark.parametrize("method", EXACT_AT_INIT)
def test_exact_at_init_equals_zero_shot_prompt(method):
    """"X X X X {class}." with the context from "a photo of a" is the zero-shot prompt: same logits, bitwise. The
    plain model is frozen like the adapted one, so its vision pooling head (an nn.MultiheadAttention, whose fast path
    depends on requires_grad) runs the same kernels."""
    plain = tiny_siglip().requires_grad_(False)
    expected = plain(**zero_shot_inputs()).logits_per_image
    model = adapted(method)
    with torch.no_grad():
        torch.testing.assert_close(model(**placeholder_inputs()).logits_per_image, expected, rtol=0, atol=0)
        pixels = zero_shot_inputs()["pixel_values"]
        torch.testing.assert_close(classifier(model)(pixels).logits, classifier(plain)(pixels).logits, rtol=0, atol=0)


@methods
def test_classifier_logits_are_siglips_own(method):
    """exp(logit_scale) * cos + logit_bias: the classifier equals SiglipModel's logits_per_image on the same
    prompts, with and without the adapter."""
    model = adapted(method, init_weights=False)
    inputs = placeholder_inputs()
    with torch.no_grad():
        expected = model(**inputs).logits_per_image
        assert_fp32_close(classifier(model)(inputs["pixel_values"]).logits, expected)
        plain = tiny_siglip()
        assert_fp32_close(classifier(plain)(inputs["pixel_values"]).logits,
                          plain(**zero_shot_inputs()).logits_per_image)


def test_sigmoid_loss_is_siglips_loss():
    """On B images against B classes with labels 0..B-1, the classifier's loss is `SiglipModel(return_loss=True)`'s."""
    plain = tiny_siglip()
    pixels = tiny_pixel_values(batch=3)
    out = plain(input_ids=zero_shot_inputs()["input_ids"], pixel_values=pixels, return_loss=True)
    clf = classifier(plain)
    ours = clf(pixels, labels=torch.arange(3)).loss
    assert_fp32_close(ours, out.loss)
    assert_fp32_close(sigmoid_loss(out.logits_per_image, torch.arange(3)), out.loss)


@methods
def test_merge_equals_unmerged_and_touches_only_the_context_rows(method):
    model = adapted(method, init_weights=False)
    inputs = placeholder_inputs()
    with torch.no_grad():
        expected = model(**inputs).logits_per_image
        merged = model.merge_and_unload()
        assert type(merged) is SiglipModel
        assert_fp32_close(merged(**inputs).logits_per_image, expected)
    before = tiny_siglip().text_model.embeddings.position_embedding.weight
    after = merged.text_model.embeddings.position_embedding.weight
    torch.testing.assert_close(after[4:], before[4:], rtol=0, atol=0)
    assert bool((after[:4] != before[:4]).any(dim=1).all())


@methods
def test_save_reload_identical(method, tmp_path):
    model = adapted(method, init_weights=False)
    inputs = placeholder_inputs()
    with torch.no_grad():
        expected = model(**inputs).logits_per_image
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_siglip(), tmp_path).eval()
    assert loaded.peft_config["default"].context_start == 0
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits_per_image, expected, rtol=0, atol=0)


@methods
def test_stored_tensors_as_on_clip(method):
    """The same stored tensors (names, shapes, dtypes) as on a CLIP of the same text width (d = 32)."""
    def stored(model):
        return {k: (tuple(v.shape), v.dtype) for k, v in get_peft_model_state_dict(model).items()}

    siglip, clip = adapted(method), get_peft_model(tiny_clip(), CONFIGS[method]())
    assert stored(siglip) == stored(clip)
    if method == "coop":
        assert sum(v.numel() for v in get_peft_model_state_dict(siglip).values()) == 4 * 32
    if method == "rlp":
        assert sum(v.numel() for v in get_peft_model_state_dict(siglip).values()) == 4 * 1 + 1 * 32


@pytest.mark.parametrize("method", ["coop", "rlp"])
def test_one_step_lowers_the_sigmoid_loss(method):
    model = adapted(method)
    clf = classifier(model).train()
    pixels, labels = tiny_pixel_values(batch=4, seed=3), torch.tensor([0, 1, 2, 1])
    params = [p for p in model.parameters() if p.requires_grad]
    assert not model.base_model.model.logit_bias.requires_grad
    before = clf(pixels, labels=labels).loss
    before.backward()
    with torch.no_grad():
        for p in params:
            p -= 0.05 * p.grad
        after = clf(pixels, labels=labels).loss
    assert float(after) < float(before)


def test_clip_adapter_layout_refused_on_the_other_family(tmp_path):
    adapted("coop").save_pretrained(tmp_path)
    clip = tiny_clip()
    state = {k: v.clone() for k, v in clip.state_dict().items()}
    with pytest.raises(ValueError, match="context starts at position 0.*CLIP model"):
        PeftModel.from_pretrained(clip, tmp_path)
    assert all(torch.equal(v, clip.state_dict()[k]) for k, v in state.items())
    with pytest.raises(ValueError, match="context starts at position 1.*SigLIP model"):
        get_peft_model(tiny_siglip(), CoOpConfig(context_start=1, **prompt_kwargs()))


@pytest.mark.parametrize("make_config, reason", [
    (lambda: MaPLeConfig(**prompt_kwargs()), "no class token and pools all tokens"),
    (lambda: QPromptConfig(host="maple", bits=1, **prompt_kwargs()), "no class token and pools all tokens"),
    (lambda: CoCoOpConfig(**prompt_kwargs()), "SiglipModel is not supported"),
])
def test_cocoop_and_maple_refuse_siglip_with_the_reason(make_config, reason):
    model = tiny_siglip()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=reason):
        get_peft_model(model, make_config())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert not any(".base_layer" in name for name, _ in model.named_modules())
