from __future__ import annotations

from dataclasses import dataclass, field

from peft.utils import PeftType

from ...merging import TokenMergingConfig


@dataclass
class PYRAConfig(TokenMergingConfig):
    """Configuration of a [`PYRAModel`] (Xiong et al., "PYRA: Parallel Yielding Re-Activation for Training-Inference
    Efficient Task Adaptation", ECCV 2024).

    PYRA = LoRA on the q/k/v projections + ToMe token merging + a re-activation of the sources about to be merged: in
    every layer with r_l > 0 the r_l size-weighted source tokens S and their destinations T give
    ``M = LayerNorm(S + T)``, a channel weight ``c = 2σ(W_rᵀ M)`` (W_r: r_l×1) and a token weight
    ``t = 2σ(M W_Dᵀ) − 1`` (W_D: 1×D), and the merged sources are ``S ⊙ (1 + c ⊙ t)``. W_D starts at zero, so at
    initialisation PYRA is exactly LoRA + ToMe.

    Defaults follow the official release (THU-MIG/PYRA): schedule preset 'low', LoRA rank 8 with one A shared by
    q, k and v (timm's fused qkv), no α/r scaling (scale 1), input dropout 0.1, W_r ~ U(-1, 1), LayerNorm eps 1e-5.
    The schedule is part of the weight shapes (W_r has r_l rows): it must respect the 50 % rule at the configured
    image size, and the adapter only runs at that resolution.
    """

    merge_schedule: int | str | list[int] | dict = field(
        default="low",
        metadata={"help": "As in ToMeConfig; default PYRA's 'low' preset (ViT-B/16: 16 tokens x 11 layers, then 10)."},
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank on q/k/v (official: ViT-B 8, ViT-L 12, ViT-S 4)."})
    lora_dropout: float = field(default=0.1, metadata={"help": "Dropout on the LoRA input."})
    lora_scale: float = field(default=1.0, metadata={"help": "Multiplier of B·A (official: 1, no alpha/r scaling)."})
    lora_shared_qkv_a: bool = field(
        default=True,
        metadata={
            "help": "True (official, timm's fused qkv): one A (r×D) shared by q, k, v and B of 3D×r. False: separate "
            "A_q, A_k, A_v (stored as one 3r×D tensor)."
        },
    )
    pyra_layernorm_eps: float = field(default=1e-5, metadata={"help": "eps of PYRA's own LayerNorm over S + T."})
    pyra_lr: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of W_r, W_D and PYRA's LayerNorm in `pyra_param_groups`; None = the LoRA lr (what "
            "the official runs actually used)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.PYRA
        if not isinstance(self.lora_r, int) or isinstance(self.lora_r, bool) or self.lora_r < 1:
            raise ValueError(f"lora_r must be a positive int, got {self.lora_r!r}.")
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be a probability in [0, 1), got {self.lora_dropout!r}.")
        if not isinstance(self.lora_scale, (int, float)) or isinstance(self.lora_scale, bool):
            raise ValueError(f"lora_scale must be a number, got {self.lora_scale!r}.")
        if not isinstance(self.lora_shared_qkv_a, bool):
            raise ValueError(f"lora_shared_qkv_a must be a bool, got {self.lora_shared_qkv_a!r}.")
        if not isinstance(self.pyra_layernorm_eps, (int, float)) or self.pyra_layernorm_eps <= 0:
            raise ValueError(f"pyra_layernorm_eps must be > 0, got {self.pyra_layernorm_eps!r}.")
        if self.pyra_lr is not None and (not isinstance(self.pyra_lr, (int, float)) or self.pyra_lr <= 0):
            raise ValueError(f"pyra_lr must be None or > 0, got {self.pyra_lr!r}.")
