"""peft_effadapt: efficient-adaptation methods as native Hugging Face PEFT types.

Importing this package registers every method with peft; nothing else needs to be called::

    import peft_effadapt
    from peft import get_peft_model
    model = get_peft_model(vit, peft_effadapt.ConsolidatorConfig(modules_to_save=["classifier"]))
"""

from . import registration
from .tasks import CLIPVideoRetrieval, CLIPZeroShotClassifier, evaluate_base_to_novel, retrieval_metrics  # issue 7
from .tuners.cocoop import CoCoOpConfig, CoCoOpModel
from .tuners.consolidator import ConsolidatorConfig, ConsolidatorModel
from .tuners.coop import CoOpConfig, CoOpModel
from .tuners.maple import MaPLeConfig, MaPLeModel
from .tuners.pyra import PYRAConfig, PYRAModel, pyra_param_groups
from .tuners.qprompt import QPromptConfig, QPromptModel
from .tuners.rlp import RLPConfig, RLPModel
from .tuners.tempme import TempMeConfig, TempMeModel  # issue 7
from .tuners.tome import ToMeConfig, ToMeModel

registration.register("consolidator", ConsolidatorConfig, ConsolidatorModel)
registration.register("coop", CoOpConfig, CoOpModel)
registration.register("rlp", RLPConfig, RLPModel)
registration.register("tome", ToMeConfig, ToMeModel)
registration.register("pyra", PYRAConfig, PYRAModel)
registration.register("qprompt", QPromptConfig, QPromptModel)
registration.register("tempme", TempMeConfig, TempMeModel)
registration.register("cocoop", CoCoOpConfig, CoCoOpModel)
registration.register("maple", MaPLeConfig, MaPLeModel)

__version__ = "0.1.0"

# LFTL (issue 9): source-free active domain adaptation (not a PEFT type: a sampler + Trainer loop over any adapter).
from .active import (  # noqa: E402
    ActiveAdaptationLoop,
    ActiveSampler,
    AnchorMemory,
    ContrastiveActiveSampler,
    EntropySampler,
    ImagePreprocess,
    LFTLConfig,
    MarginSampler,
    RandomSampler,
    VPATrainer,
    budget_schedule,
)

__all__ = [
    "CLIPZeroShotClassifier",
    "CoOpConfig",
    "CoOpModel",
    "CoCoOpConfig",
    "CoCoOpModel",
    "MaPLeConfig",
    "MaPLeModel",
    "ConsolidatorConfig",
    "ConsolidatorModel",
    "RLPConfig",
    "RLPModel",
    "PYRAConfig",
    "PYRAModel",
    "QPromptConfig",
    "QPromptModel",
    "ToMeConfig",
    "ToMeModel",
    "__version__",
    "evaluate_base_to_novel",
    "pyra_param_groups",
    # issue 7: TempMe and text-video retrieval
    "CLIPVideoRetrieval",
    "TempMeConfig",
    "TempMeModel",
    "retrieval_metrics",
    "ActiveAdaptationLoop",
    "ActiveSampler",
    "AnchorMemory",
    "ContrastiveActiveSampler",
    "EntropySampler",
    "ImagePreprocess",
    "LFTLConfig",
    "MarginSampler",
    "RandomSampler",
    "VPATrainer",
    "budget_schedule",
]

# Structured pruning (issue 8): Trainer callbacks that slim a model, and the save/load pair for slimmed models.
from .pruning import CentripetalSGDCallback, ResRepCallback, load_slimmed, save_slimmed  # noqa: E402

__all__ += ["CentripetalSGDCallback", "ResRepCallback", "load_slimmed", "save_slimmed"]
