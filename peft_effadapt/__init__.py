"""peft_effadapt: efficient-adaptation methods as native Hugging Face PEFT types.

Importing this package registers every method with peft (each tuner registers itself); nothing else needs to be
called::

    import peft_effadapt
    from peft import get_peft_model
    model = get_peft_model(vit, peft_effadapt.ConsolidatorConfig(modules_to_save=["classifier"]))
"""

from . import compat
from ._version import __version__
from .active import ActiveAdaptationLoop, ContrastiveActiveSampler, ImagePreprocess, LFTLConfig, VPATrainer
from .compiling import compile_for_inference
from .pruning import (
    CentripetalSGDCallback,
    CSGDConfig,
    ResRepCallback,
    ResRepConfig,
    csgd_param_groups,
    load_slimmed,
    resrep_param_groups,
    save_slimmed,
    widths_for_flops,
)
from .tasks import (
    CLIPVideoRetrieval,
    CLIPZeroShotClassifier,
    evaluate_base_to_novel,
    retrieval_metrics,
    zero_shot_pipeline_kwargs,
)
from .tuners.cocoop import CoCoOpConfig, CoCoOpModel
from .tuners.consolidator import ConsolidatorConfig, ConsolidatorModel
from .tuners.coop import CoOpConfig, CoOpModel
from .tuners.maple import MaPLeConfig, MaPLeModel
from .tuners.pyra import PYRAConfig, PYRAModel, pyra_param_groups
from .tuners.qprompt import QPromptConfig, QPromptModel
from .tuners.rlp import RLPConfig, RLPModel
from .tuners.tempme import TempMeConfig, TempMeModel
from .tuners.tome import ToMeConfig, ToMeModel

compat.install()  # transformers >= 5.24 gates its own adapter methods at peft >= 0.22: say so clearly

__all__ = [
    "__version__",
    # PEFT types: a config for `get_peft_model` and the tuner peft builds from it
    "CoCoOpConfig",
    "CoCoOpModel",
    "CoOpConfig",
    "CoOpModel",
    "ConsolidatorConfig",
    "ConsolidatorModel",
    "MaPLeConfig",
    "MaPLeModel",
    "PYRAConfig",
    "PYRAModel",
    "QPromptConfig",
    "QPromptModel",
    "RLPConfig",
    "RLPModel",
    "TempMeConfig",
    "TempMeModel",
    "ToMeConfig",
    "ToMeModel",
    "pyra_param_groups",
    # inference: one compiled graph (CUDA graphs on a GPU) for every PEFT type and slimmed model
    "compile_for_inference",
    # tasks: CLIP classification and text-video retrieval on top of an adapted model
    "CLIPVideoRetrieval",
    "CLIPZeroShotClassifier",
    "evaluate_base_to_novel",
    "retrieval_metrics",
    "zero_shot_pipeline_kwargs",
    # structured pruning: Trainer callbacks that slim a model, and the save/load pair for slimmed models
    "CSGDConfig",
    "CentripetalSGDCallback",
    "ResRepCallback",
    "ResRepConfig",
    "csgd_param_groups",
    "load_slimmed",
    "resrep_param_groups",
    "save_slimmed",
    "widths_for_flops",
    # LFTL (active domain adaptation): config, query strategy, per-round Trainer, the loop that runs the rounds
    "ActiveAdaptationLoop",
    "ContrastiveActiveSampler",
    "ImagePreprocess",
    "LFTLConfig",
    "VPATrainer",
]
