"""peft_effadapt: efficient-adaptation methods as native Hugging Face PEFT types.

Importing this package registers every method with peft; nothing else needs to be called::

    import peft_effadapt
    from peft import get_peft_model
    model = get_peft_model(vit, peft_effadapt.ConsolidatorConfig(modules_to_save=["classifier"]))
"""

from . import registration
from .tuners.consolidator import ConsolidatorConfig, ConsolidatorModel

registration.register("consolidator", ConsolidatorConfig, ConsolidatorModel)

__version__ = "0.1.0"

__all__ = ["ConsolidatorConfig", "ConsolidatorModel", "__version__"]
