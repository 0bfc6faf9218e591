"""The support matrix of docs/support-matrix.md is the one the tests' parametrisation implies, and every refusal in
it is raised."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import get_peft_model

from peft_effadapt import CoCoOpConfig, MaPLeConfig, TempMeConfig

import support_matrix
from siglip_models import prompt_kwargs, tiny_siglip

SUPPORT_MATRIX_PAGE = Path(__file__).resolve().parents[1] / "docs" / "support-matrix.md"


def test_the_docs_hold_the_generated_matrix():
    assert support_matrix.render() in SUPPORT_MATRIX_PAGE.read_text(), (
        "docs/support-matrix.md is out of date: paste the output of `python tests/support_matrix.py`"
    )


def test_every_listed_pytest_node_exists():
    for node in support_matrix.PRUNING_TESTED.values():
        path, name = node.split("::")
        assert f"def {name}(" in (SUPPORT_MATRIX_PAGE.parents[1] / path).read_text(), node


def _dinov2():
    from transformers import Dinov2Config, Dinov2Model

    return Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                                    patch_size=8))


REFUSALS = {
    ("MaPLe", "SigLIP"): (tiny_siglip, lambda: MaPLeConfig(prompt_depth=1, **prompt_kwargs())),
    ("CoCoOp", "SigLIP"): (tiny_siglip, lambda: CoCoOpConfig(**prompt_kwargs())),
    ("TempMe", "SigLIP"): (tiny_siglip, lambda: TempMeConfig(num_frames=4)),
    ("TempMe", "DINOv2"): (_dinov2, lambda: TempMeConfig(num_frames=4)),
}


@pytest.mark.parametrize("pair", sorted(support_matrix.REFUSED))
def test_every_refusal_is_raised_and_leaves_the_model_untouched(pair):
    make_model, make_config = REFUSALS[pair]
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises((ValueError, TypeError)):
        get_peft_model(model, make_config())
    assert set(model.state_dict()) == set(before)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
