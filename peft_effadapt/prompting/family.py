"""Text-tower families the prompt methods know, told apart by the class of their text embeddings (subclasses
accepted, never by class name): where the context starts and how prompts are padded.

- CLIP (`CLIPTextEmbeddings`): "[BOS] X X X X {class}. [EOS]" padded to the longest row; causal mask, EOS pooling.
- SigLIP (`SiglipTextEmbeddings`): "X X X X {class}. </s>" padded to max_length (no BOS, as SigLIP's tokenizer;
  the text tower attends every position and pools the LAST one, so rows must be padded as its processor does:
  `padding="max_length"`, no attention mask).
"""

from __future__ import annotations

from dataclasses import dataclass

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.models.clip.modeling_clip import CLIPTextEmbeddings
from transformers.models.siglip.modeling_siglip import SiglipTextEmbeddings


@dataclass(frozen=True)
class TextFamily:
    name: str
    context_start: int  # position of the first context row: 1 after BOS, 0 without BOS
    pad_to_max_length: bool  # last-position pooling: every row padded to the tower's max_length, all attended

    @property
    def has_bos(self) -> bool:
        return self.context_start == 1


CLIP_TEXT = TextFamily("CLIP", context_start=1, pad_to_max_length=False)
SIGLIP_TEXT = TextFamily("SigLIP", context_start=0, pad_to_max_length=True)
FAMILIES = ((CLIPTextEmbeddings, CLIP_TEXT), (SiglipTextEmbeddings, SIGLIP_TEXT))


def text_family(module: nn.Module) -> TextFamily | None:
    """The family of a text embeddings module (or of the base layer of a tuner layer around one); None otherwise."""
    if isinstance(module, BaseTunerLayer):
        module = module.get_base_layer()
    return next((family for cls, family in FAMILIES if isinstance(module, cls)), None)

