"""The CoOp baseline: counts, init equivalence, class-specific context and its limits."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from peft_effadapt import CoOpConfig
from peft_effadapt.testing import tiny_clip, tiny_pixel_values

CTX = [10, 11, 12, 13]
PROMPTS = torch.tensor([[1, 7, 7, 7, 7, 20, 5, 2, 0], [1, 7, 7, 7, 7, 21, 22, 5, 2], [1, 7, 7, 7, 7, 23, 5, 2, 0]])
ZERO_SHOT = PROMPTS.clone()
ZERO_SHOT[:, 1:5] = torch.tensor(CTX)
PIXELS = tiny_pixel_values(4)


def coop(**kw):
    return CoOpConfig(ctx_init_token_ids=CTX, placeholder_token_id=7, **kw)


def logits(model, ids=PROMPTS):
    return model(input_ids=ids, pixel_values=PIXELS).logits_per_image


def test_counts_unified_and_class_specific():
    assert get_peft_model(tiny_clip(), coop()).get_nb_trainable_parameters()[0] == 4 * 32
    assert get_peft_model(tiny_clip(), coop(csc=True, num_classes=3)).get_nb_trainable_parameters()[0] == 3 * 4 * 32


@pytest.mark.parametrize("csc", [False, True])
def test_init_from_ctx_init_equals_zero_shot_clip_exactly(csc):
    model = get_peft_model(tiny_clip(), coop(csc=csc, num_classes=3 if csc else None))
    torch.testing.assert_close(logits(model), logits(tiny_clip(), ZERO_SHOT), rtol=0, atol=0)


def test_random_init_without_ctx_init():
    model = get_peft_model(tiny_clip(), CoOpConfig(ctx_init=None, n_ctx=12, placeholder_token_id=7))
    ctx = model.base_model.prompt_layer().coop_ctx["default"]
    assert ctx.shape == (12, 32) and 0.01 < float(ctx.std()) < 0.03


def test_class_specific_context_trains_each_class_separately():
    model = get_peft_model(tiny_clip(), coop(csc=True, num_classes=3))
    model.train()
    torch.nn.functional.cross_entropy(logits(model), torch.tensor([0, 1, 2, 0])).backward()
    grad = model.base_model.prompt_layer().coop_ctx["default"].grad
    assert all(grad[c].abs().sum() > 0 for c in range(3))


def test_class_specific_context_refuses_merge_and_other_batches():
    model = get_peft_model(tiny_clip(), coop(csc=True, num_classes=3))
    with pytest.raises(ValueError, match="class-specific"):
        model.merge_adapter()
    with pytest.raises(ValueError, match="3 class prompts"):
        logits(model, PROMPTS[:2])


def test_damaged_context_shape_is_rejected(tmp_path):
    from peft import PeftModel

    get_peft_model(tiny_clip(), coop(csc=True, num_classes=3)).save_pretrained(tmp_path)
    import json
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["num_classes"] = 5
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    base = tiny_clip()
    with pytest.raises(ValueError, match="shape"):
        PeftModel.from_pretrained(base, tmp_path)
    assert not any("coop" in n for n, _ in base.named_modules())
