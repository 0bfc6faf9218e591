from __future__ import annotations

from dataclasses import dataclass, field

from peft.config import PeftConfig
from peft.utils import PeftType

from ...peft_hooks import VerifiedAdapterFilesMixin

# Official MSRVTT setting for CLIP ViT-B/32 (LunarShen/TempMe main.py / scripts/MSRVTT.sh): 600 -> 97 tokens per video.
VIT_B32 = dict(
    num_frames=12, imgme_r=2, clip_merge_layers=[8, 9, 10], clip_group_sizes=[2, 2, 3], cross_clip_merge_ratio=0.30,
    intra_clip_merge_ratio=0.10,
)
# ViT-B/16: NOT released. The paper states ImgMe r = 10 and 127 output tokens; keeping layers 8-9-10 and groups
# 2-2-3, the ratios 40/20 are the ones that give exactly 127 tokens (and 121.3 GMACs vs the paper's 121.4 GFLOPs).
# Inferred by us, unverified.
VIT_B16_INFERRED = dict(VIT_B32, imgme_r=10, cross_clip_merge_ratio=0.40, intra_clip_merge_ratio=0.20)
# The bundled tiny CLIP (peft_effadapt.testing.load_tiny_clip: 3 vision layers, 32² frames, patch 4 -> 65 tokens):
# our own choice, not from the paper. Layer 0 ImgMe (r = 8), then 12 -> 4 -> 1 clips: 780 -> 273 tokens per video.
TESTBED = dict(VIT_B32, imgme_r=8, clip_merge_layers=[1, 2], clip_group_sizes=[3, 4])
PRESETS = {"vit-b/32": VIT_B32, "vit-b/16": VIT_B16_INFERRED, "testbed": TESTBED}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class TempMeConfig(VerifiedAdapterFilesMixin, PeftConfig):
    """Configuration of a [`TempMeModel`] (Shen et al., "TempMe: Video Temporal Token Merging for Efficient
    Text-Video Retrieval", ICLR 2025).

    The CLIP image encoder processes the `num_frames` frames of each video (contiguous in the batch) with a
    progressive merging schedule: ImgMe blocks (ToMe inside each frame, r = `imgme_r`), ClipMe blocks at
    `clip_merge_layers` (concatenate `clip_group_sizes` neighbouring frames/clips, merge a fraction
    `cross_clip_merge_ratio` across them before attention and `intra_clip_merge_ratio` inside the new clip after it),
    and intra-clip merging in the blocks after. Trained: LoRA on q/k/v of every attention of both towers (official:
    one A shared by q, k, v, rank 8, no α/r scaling), zero-initialised clip position embeddings (one vector per
    frame/clip entering each ClipMe block). Defaults are the official ViT-B/32 setting; `TempMeConfig.from_preset(
    "vit-b/16")` gives our *inferred* ViT-B/16 setting (r = 10, ratios 40/20: 127 tokens; not released by the
    authors). `full_finetune=True` additionally trains every backbone weight (the paper's CLIP4Clip + TempMe row).
    """

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": r"Encoder layers to wrap. None: every vision layer and, with LoRA on text, every text layer "
            r"('(vision_model|text_model)\.encoder\.layers\.\d+' for CLIPModel). Every vision layer must be a target."
        },
    )
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules to leave alone."})
    num_frames: int = field(default=12, metadata={"help": "Frames per video (contiguous in the image batch)."})
    imgme_r: int = field(default=2, metadata={"help": "Tokens merged per frame in each ImgMe block (B/16: 10)."})
    clip_merge_layers: list[int] = field(
        default_factory=lambda: [8, 9, 10], metadata={"help": "0-based vision layers that run ClipMe."}
    )
    clip_group_sizes: list[int] = field(
        default_factory=lambda: [2, 2, 3],
        metadata={"help": "Frames/clips concatenated at each ClipMe layer; their product must divide num_frames."},
    )
    cross_clip_merge_ratio: float = field(
        default=0.30, metadata={"help": "p_c: fraction of a new clip's tokens merged across clips (R_C = 1 - p_c)."}
    )
    intra_clip_merge_ratio: float = field(
        default=0.10, metadata={"help": "p_i: fraction merged inside a clip after attention (R_I = 1 - p_i)."}
    )
    clip_position_embedding: bool = field(
        default=True, metadata={"help": "Zero-initialised per-frame/clip position vectors added in ClipMe layers."}
    )
    prop_attn: bool = field(default=True, metadata={"help": "Proportional attention (log token size bias)."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank on q/k/v; 0 = no LoRA (e.g. with full_finetune)."})
    lora_scale: float = field(default=1.0, metadata={"help": "Multiplier of B·A (official: 1, no alpha/r scaling)."})
    lora_shared_qkv_a: bool = field(
        default=True,
        metadata={"help": "True (official): one A (r×D) shared by q, k, v. False: standard per-projection LoRA."},
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    lora_on_text: bool = field(default=True, metadata={"help": "Also put LoRA in the CLIP text tower."})
    full_finetune: bool = field(
        default=False,
        metadata={
            "help": "Train every backbone weight too (logit_scale stays frozen). peft saves only the TempMe tensors: "
            "save the fine-tuned backbone from `model.unload()` as well."
        },
    )
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Modules trained and saved in full."})
    num_tokens: int | None = field(
        default=None, metadata={"help": "Set when the adapter is created: tokens per frame entering layer 0."}
    )
    init_weights: bool = field(
        default=True, metadata={"help": "False: start LoRA B and position embeddings at random values (tests only)."}
    )

    @classmethod
    def from_preset(cls, name: str, **overrides) -> TempMeConfig:
        """'vit-b/32' (official), 'vit-b/16' (inferred, see the class docstring) or 'testbed' (the bundled tiny
        CLIP); keyword arguments override."""
        if name not in PRESETS:
            raise ValueError(f"unknown TempMe preset {name!r}; presets: {sorted(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.TEMPME
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                setattr(self, name, set(value))
        for name in ("clip_merge_layers", "clip_group_sizes"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not all(_is_int(v) and v >= 0 for v in value):
                raise ValueError(f"{name} must be a list of ints >= 0, got {value!r}.")
            setattr(self, name, list(value))
        for name, low in (("num_frames", 1), ("imgme_r", 0), ("lora_r", 0)):
            if not _is_int(getattr(self, name)) or getattr(self, name) < low:
                raise ValueError(f"{name} must be an int >= {low}, got {getattr(self, name)!r}.")
        for name in ("cross_clip_merge_ratio", "intra_clip_merge_ratio", "lora_dropout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be a number in [0, 1), got {value!r}.")
        if not isinstance(self.lora_scale, (int, float)) or isinstance(self.lora_scale, bool):
            raise ValueError(f"lora_scale must be a number, got {self.lora_scale!r}.")
        for name in ("clip_position_embedding", "prop_attn", "lora_shared_qkv_a", "lora_on_text", "full_finetune",
                     "init_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}.")
        if self.num_tokens is not None and (not _is_int(self.num_tokens) or self.num_tokens < 2):
            raise ValueError(f"num_tokens must be an int >= 2, got {self.num_tokens!r}.")
        if len(self.clip_merge_layers) != len(self.clip_group_sizes):
            raise ValueError(
                f"clip_merge_layers {self.clip_merge_layers} and clip_group_sizes {self.clip_group_sizes} must have the "
                "same length (one group size per clip-merge layer)."
            )
        product = 1
        for g in self.clip_group_sizes:
            product *= max(g, 1)
        if self.num_frames % product:
            raise ValueError(
                f"num_frames={self.num_frames} is not divisible by the product of clip_group_sizes "
                f"{self.clip_group_sizes} (= {product}): every ClipMe layer must group whole frames/clips."
            )
