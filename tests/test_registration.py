import copy
import importlib
import json
import pickle
import subprocess
import sys

import peft
import pytest
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType

import peft_effadapt
from peft_effadapt import ConsolidatorConfig, ConsolidatorModel, peft_hooks


@pytest.mark.parametrize("name", peft_hooks.registered_peft_types())
def test_members_behave_like_peft_members(name):
    member = PeftType[name]
    assert member is getattr(PeftType, name) is PeftType(name)
    assert member == name and member.value == name and member.name == name
    assert member in list(PeftType)
    assert json.dumps(member) == f'"{name}"'
    assert pickle.loads(pickle.dumps(member)) is member
    assert copy.deepcopy(member) is member
    with pytest.raises(AttributeError):
        setattr(PeftType, name, "something else")


def test_consolidator_is_registered_with_prefix():
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.CONSOLIDATOR] is ConsolidatorConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.CONSOLIDATOR] is ConsolidatorModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.CONSOLIDATOR] == "consolidator_"
    assert ConsolidatorConfig().peft_type is PeftType.CONSOLIDATOR


def test_import_twice_and_reload_are_idempotent():
    peft_hooks.register_peft_method(name="consolidator", config_cls=ConsolidatorConfig, model_cls=ConsolidatorModel)
    importlib.reload(peft_hooks)
    try:
        reloaded = importlib.reload(peft_effadapt)
        assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.CONSOLIDATOR] is reloaded.ConsolidatorConfig
        assert list(PeftType).count(PeftType.CONSOLIDATOR) == 1
    finally:  # point peft back at the classes the other test modules imported
        peft_hooks.register_peft_method(name="consolidator", config_cls=ConsolidatorConfig, model_cls=ConsolidatorModel)
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.CONSOLIDATOR] is ConsolidatorConfig


def test_conflicting_registration_is_a_clear_error():
    class OtherConfig(ConsolidatorConfig):
        pass

    with pytest.raises(ValueError, match="already registered"):
        peft_hooks.register_peft_method(name="consolidator", config_cls=OtherConfig, model_cls=ConsolidatorModel)


def test_colliding_prefix_is_refused_before_any_member_is_added():
    class Tuner(ConsolidatorModel):
        prefix = "lora_x_"

    with pytest.raises(ValueError, match="collides with 'lora_'"):
        peft_hooks.register_peft_method(name="lora_x", config_cls=ConsolidatorConfig, model_cls=Tuner)
    assert "LORA_X" not in PeftType.__members__


def test_bad_member_names_are_refused():
    with pytest.raises(ValueError, match="upper-case"):
        peft_hooks.add_peft_type("lower")
    assert peft_hooks.add_peft_type("LORA") is PeftType.LORA


def test_loading_without_import_names_the_type_and_works_after_import(tmp_path):
    """A fresh process that forgets `import peft_effadapt` cannot resolve the type; importing it fixes that."""
    from peft import get_peft_model

    from peft_effadapt.testing import tiny_vit

    get_peft_model(tiny_vit(), ConsolidatorConfig(fc_groups=[16])).save_pretrained(tmp_path)
    code = (
        "import sys, peft\n"
        f"try:\n    peft.PeftConfig.from_pretrained({str(tmp_path)!r})\n"
        "except Exception as e:\n    print('ERR', type(e).__name__, e)\n"
        "import peft_effadapt\n"
        f"print('OK', type(peft.PeftConfig.from_pretrained({str(tmp_path)!r})).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert "CONSOLIDATOR" in out.splitlines()[0]
    assert out.splitlines()[-1] == "OK ConsolidatorConfig"
    assert peft.PeftConfig.from_pretrained(tmp_path).fc_groups == [16]


def test_get_peft_model_does_not_warn_about_peft_s_checkpointing_probe(tmp_path):
    """peft 0.21 reads the deprecated `is_gradient_checkpointing` in PeftModel.__init__; that one FutureWarning is
    silenced there (for every PEFT type), while the user's own use of the deprecated name still warns."""
    import warnings

    from peft import LoraConfig, PeftModel, get_peft_model

    from peft_effadapt.testing import tiny_vit

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for config in (ConsolidatorConfig(), LoraConfig(target_modules=["q_proj"])):
            model = get_peft_model(tiny_vit(), config)
        model.save_pretrained(tmp_path)
        PeftModel.from_pretrained(tiny_vit(), tmp_path)
    assert PeftModel.__init__.__wrapped__ is not None
    base = tiny_vit()
    if hasattr(type(base), "is_activation_checkpointing"):  # transformers releases that deprecate the alias
        with pytest.warns(FutureWarning, match="is_gradient_checkpointing"):
            base.is_gradient_checkpointing  # noqa: B018


def test_wrapping_peft_model_init_is_idempotent():
    from peft import PeftModel

    first = PeftModel.__init__
    peft_hooks.quiet_checkpointing_probe()
    assert PeftModel.__init__ is first
