"""peft_effadapt: efficient-adaptation methods as native Hugging Face PEFT types.

Importing this package registers every method with peft; nothing else needs to be called::

    import peft_effadapt
    from peft import get_peft_model
    model = get_peft_model(vit, peft_effadapt.ConsolidatorConfig(modules_to_save=["classifier"]))
"""

from . import registration
from .tasks import CLIPZeroShotClassifier, evaluate_base_to_novel
from .tuners.consolidator import ConsolidatorConfig, ConsolidatorModel
from .tuners.coop import CoOpConfig, CoOpModel
from .tuners.pyra import PYRAConfig, PYRAModel, pyra_param_groups
from .tuners.rlp import RLPConfig, RLPModel
from .tuners.tome import ToMeConfig, ToMeModel

registration.register("consolidator", ConsolidatorConfig, ConsolidatorModel)
registration.register("coop", CoOpConfig, CoOpModel)
registration.register("rlp", RLPConfig, RLPModel)
registration.register("tome", ToMeConfig, ToMeModel)
registration.register("pyra", PYRAConfig, PYRAModel)

__version__ = "0.1.0"

__all__ = [
    "CLIPZeroShotClassifier",
    "CoOpConfig",
    "CoOpModel",
    "ConsolidatorConfig",
    "ConsolidatorModel",
    "RLPConfig",
    "RLPModel",
    "PYRAConfig",
    "PYRAModel",
    "ToMeConfig",
    "ToMeModel",
    "__version__",
    "evaluate_base_to_novel",
    "pyra_param_groups",
]
