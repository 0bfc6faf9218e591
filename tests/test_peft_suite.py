"""peft's own test suite against our PEFT types: every check of peft's `TestPeftCustomModel` (tests/test_custom_models.py
of the installed peft's sdist, see peft_suite_source.py) that is parametrised over peft's TEST_CASES (44 checks) runs
unchanged on our cases below, with default configs. Checks parametrised over other lists test one peft method's own
features (LoRA variants, trainable tokens, weighted adapters, ...) and are not collected.

The protocol: `model(X)` with X a [9, 10] integer tensor returns one tensor, and the adapter changes it.
Fitted: Consolidator on peft's MLP (`target_modules` named: a plain nn.Module has no model type to default from) and
on a tiny ViT (`ConsolidatorConfig()` as is) that reads X as pixels, each also with two branches (MLP: fc_groups
[2, 1]; ViT: [16, 8], channel shuffle on the first, DropPath 0.3), all under the default save (the branch form, which
test_save_pretrained and test_parameters_after_loading_model need to reload as the same parameters); PYRA on the same
ViT (`PYRAConfig()` as is: the 'low' preset resolves to r = [8, 4] at its 17 tokens). Where Consolidator differs from a
check's premise:
- test_disable_adapters(_with_merging) assume identity at init; the paper's init U(-1e-3, 1e-3) is not (peft exempts
  DEFT-PaRa, not identity at init, the same way): these two run with the spec's `init_range=0`.
- test_only_params_are_updated (ViT) is a strict xfail: it wants every adapter tensor to change, but a key
  projection's bias has exactly zero gradient (softmax over keys ignores q.b_k).
- test_active_adapter (ViT) gets peft's own skip for modules_to_save: `train_layernorm=True` adds the LayerNorms.
- test_save_pretrained_pickle is replaced: our loaders refuse to unpickle adapter_model.bin (safetensors only).
Where PYRA differs:
- test_disable_adapters(_with_merging): at init PYRA is LoRA + ToMe, and merging tokens is not identity; these two
  run with `merge_schedule=0` (the spec: no merging and no PYRA module, so LoRA alone, B = 0 at init). Disabling
  with merging on is checked by test_conformance.py.
- test_only_params_are_updated runs with `merge_schedule=[8, 0]`: the last merging layer's W_r, W_D and LayerNorm
  get exactly zero gradient when the head reads only CLS (the MLP after the merge is token-wise; spec b.5).
- test_merge_layers: merged, unmerged and unloaded outputs must agree (LoRA folds exactly into q/k/v; merging and
  the modulation stay); its last comparison must fail, and only it: the merged model merges tokens by its forward,
  not by a weight, so the saved merged ViT reloads as the plain ViT (save the adapter to keep PYRA).
- test_save_pretrained_pickle is replaced as for Consolidator; peft skips the two `bias` checks.
Not fitted, and why:
- RLP, CoOp, QPrompt: they write context vectors at placeholder tokens of CLIP text prompts; the input must hold the
  placeholder token ids and the output is CLIP's image-text logits, so `X` cannot reach them.
- ToMe: weight-free (no trainable tensor to save, update or merge, which most checks presuppose), and its default
  schedule does not fit a tiny ViT's 17 tokens.
- TempMe: its input is a batch of B x T video frames plus text, its output CLIP's video-text logits.
"""

from __future__ import annotations

import functools
import sys
import types
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft_suite_source import peft_tests_package
from transformers import ViTForImageClassification

from peft_effadapt import ConsolidatorConfig, PYRAConfig
from peft_effadapt.testing import tiny_vit_config

sys.path.insert(0, str(peft_tests_package()))
try:
    import diffusers  # noqa: F401
except ImportError:  # peft's testing_common only uses it in isinstance checks against StableDiffusionPipeline
    sys.modules["diffusers"] = types.SimpleNamespace(StableDiffusionPipeline=type("StableDiffusionPipeline", (), {}))

from peft_tests import test_custom_models as peft_custom  # noqa: E402

ARGNAMES = "test_name, model_id, config_cls, config_kwargs"


class XViT(ViTForImageClassification):
    """A tiny ViT under peft's custom-model protocol: integer X [B, 10] -> deterministic 32x32 RGB pixels -> logits."""

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @dtype.setter
    def dtype(self, value):  # peft's tests set `model.dtype` on their custom models; ours follows the parameters
        pass

    def forward(self, X):
        x = X.to(self.dtype).repeat(1, 308)[:, : 3 * 32 * 32]
        pixels = torch.sin(x * torch.arange(1, x.shape[1] + 1, dtype=x.dtype, device=x.device) / 97)
        return super().forward(pixel_values=pixels.view(-1, 3, 32, 32)).logits


class Models(peft_custom.MockTransformerWrapper):
    @classmethod
    def from_pretrained(cls, model_id, dtype=None):
        if Path(model_id).is_dir():  # a merged model saved by a test
            return XViT.from_pretrained(model_id, dtype=dtype or torch.float32).eval()
        if model_id != "TinyViT":
            return super().from_pretrained(model_id, dtype=dtype)
        torch.manual_seed(0)
        config = tiny_vit_config()
        config._name_or_path = model_id
        return XViT(config).eval().to(dtype or torch.float32)


CASES = [
    ("Consolidator MLP", "MLP", ConsolidatorConfig, {"target_modules": ["lin0", "lin1"]}),
    ("Consolidator MLP one layer", "MLP", ConsolidatorConfig, {"target_modules": ["lin0"]}),
    ("Consolidator MLP two branches", "MLP", ConsolidatorConfig, {"target_modules": ["lin0", "lin1"], "fc_groups": [2, 1]}),
    ("Consolidator tiny ViT default", "TinyViT", ConsolidatorConfig, {}),
    ("Consolidator tiny ViT two branches DropPath", "TinyViT", ConsolidatorConfig,
     {"fc_groups": [16, 8], "channel_shuffle": [True, False], "rep_drop": 0.3}),
    ("PYRA tiny ViT default", "TinyViT", PYRAConfig, {}),
]


# Where our methods differ from what a check presupposes, and what we do instead (reported in the module docstring).
ZERO_INIT = {"test_disable_adapters", "test_disable_adapters_with_merging"}
KEY_BIAS_XFAIL = pytest.mark.xfail(
    strict=True,
    reason="every adapter tensor must change in training, but the gradient of a key-projection bias is exactly 0: "
    "softmax over the keys ignores the constant q.b_k (true of the frozen k_proj.bias too)",
)
LAYERNORM_SKIP = "Multiple active adapters with modules_to_save/trainable_token_indices is not supported."


def _case_params(name):
    params = []
    for case in CASES:
        test_name, model_id, config_cls, kwargs = case
        marks = ()
        consolidator_vit = config_cls is ConsolidatorConfig and model_id == "TinyViT"
        if name in ZERO_INIT and config_cls is ConsolidatorConfig:  # paper init U(+-1e-3) is not identity at init
            kwargs = {**kwargs, "init_range": 0.0}
        if name in ZERO_INIT and config_cls is PYRAConfig:  # merging tokens is not identity; with r = 0 everywhere
            kwargs = {**kwargs, "merge_schedule": 0}  # PYRA is its LoRA alone (B = 0 at init)
        if name == "test_only_params_are_updated" and config_cls is PYRAConfig:  # the last layer's PYRA gets no
            kwargs = {**kwargs, "merge_schedule": [8, 0]}  # gradient: the head reads CLS, the MLP is token-wise
        if name == "test_only_params_are_updated" and consolidator_vit:
            marks = (KEY_BIAS_XFAIL,)
        if name == "test_active_adapter" and consolidator_vit:  # train_layernorm=True: LayerNorm copies
            marks = (pytest.mark.skip(reason=LAYERNORM_SKIP),)
        params.append(pytest.param(test_name, model_id, config_cls, kwargs, id=test_name, marks=marks))
    return params


def _retargeted(name, test):
    """`test` with its TEST_CASES parametrisation replaced by ours (other marks kept)."""

    @functools.wraps(test)
    def run(*args, **kwargs):
        return test(*args, **kwargs)

    marks = [m for m in getattr(test, "pytestmark", []) if not (m.name == "parametrize" and m.args[0] == ARGNAMES)]
    run.pytestmark = marks + [pytest.mark.parametrize(ARGNAMES, _case_params(name))]
    return run


def _uses_test_cases(test) -> bool:
    return any(m.name == "parametrize" and m.args[0] == ARGNAMES for m in getattr(test, "pytestmark", []))


class TestPeftSuite(peft_custom.TestPeftCustomModel):
    transformers_class = Models

    @pytest.mark.parametrize(ARGNAMES, _case_params("test_save_pretrained_pickle"))
    def test_save_pretrained_pickle(self, test_name, model_id, config_cls, config_kwargs, tmp_path):
        """peft saves and reloads adapter_model.bin; our types save it too but refuse to unpickle it on load."""
        model = get_peft_model(self.transformers_class.from_pretrained(model_id), config_cls(**config_kwargs))
        model.save_pretrained(tmp_path, safe_serialization=False)
        assert (tmp_path / "adapter_model.bin").exists()
        with pytest.raises(ValueError, match="never unpickles"):
            PeftModel.from_pretrained(self.transformers_class.from_pretrained(model_id), tmp_path)

    @pytest.mark.parametrize(ARGNAMES, _case_params("test_merge_layers"))
    def test_merge_layers(self, test_name, model_id, config_cls, config_kwargs):
        """peft's check. PYRA passes every comparison of merged, unmerged and unloaded outputs and fails only the
        last: its merged model keeps merging tokens (a forward, not a weight), so the saved merged ViT reloads plain."""
        check = functools.partial(super().test_merge_layers, test_name, model_id, config_cls, config_kwargs)
        if config_cls is not PYRAConfig:
            return check()
        with pytest.raises(AssertionError) as failure:
            check()
        assert "logits_merged_from_pretrained" in str(failure.traceback[-1].statement)


for _name, _test in list(vars(peft_custom.TestPeftCustomModel).items()):
    if _name.startswith("test_") and callable(_test) and _name not in vars(TestPeftSuite):
        setattr(TestPeftSuite, _name, _retargeted(_name, _test) if _uses_test_cases(_test) else None)
for _base in peft_custom.TestPeftCustomModel.__mro__[1:]:  # peft's tester defines no test_ itself; stay safe
    for _name in vars(_base):
        if _name.startswith("test_") and _name not in vars(TestPeftSuite):
            setattr(TestPeftSuite, _name, None)
