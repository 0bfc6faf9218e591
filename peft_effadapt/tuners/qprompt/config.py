from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peft.utils import PeftType

from ...prompting.config import DeepPromptConfig
from ...quantization import REFIT_MODES, default_kl_threshold

HOSTS = ("coop", "rlp", "maple")
QUANTIZERS = ("kmeans", "uniform", "noise", "none")
# Quantised tensors per host when `quantize_tensors` is None (names of the adapter's latent tensors).
DEFAULT_TENSORS = {
    "coop": ["ctx"],
    # RLP: B (r x d) holds r*d of the n*r + r*d values; A (n x r, 4 numbers) is smaller than any codebook, and the
    # frozen path P0 is rebuilt from the vocabulary and never stored, so neither is quantised.
    "rlp": ["B"],
    # MaPLe: every weight tensor (context, deep text prompts, coupling matrices); biases stay full precision.
    "maple": ["ctx", "proj_weight", "deep_text_*", "coupling_*_weight"],
}


@dataclass
class QPromptConfig(DeepPromptConfig):
    """Configuration of a [`QPromptModel`] (Hao et al., "Quantized Prompt for Efficient Generalization of
    Vision-Language Models", ECCV 2024): quantisation-aware training of a CLIP prompt with a very low-bit K-means
    codebook on z-score-normalised weights, straight-through gradients and constrained adaptive clustering (CAC).

    The prompt host (`host`) is CoOp's unified context (QCoOp), RLP's low-rank prompt, or a MaPLe-style deep
    multimodal prompt (QMaPLe). Quantisation is applied in training and in eval, so the deployed prompt is the one
    evaluated; `save_pretrained` writes b-bit packed indices plus a 2^b-entry fp16 codebook per quantised tensor (260
    bytes for the 4 x 512 QCoOp context at b = 1), and the fp32 latents only with `save_latents=True`.

    What is quantised (`quantize_tensors`, '*' wildcards): QCoOp the n x d context; quantised RLP its factor B (r x d,
    almost all of the stored numbers) while A (n x r, fewer numbers than a codebook has entries) stays fp32 and the
    frozen path P0 is rebuilt from the vocabulary, never stored; QMaPLe the context, the projection, the deep text
    prompts and the coupling matrices (biases stay fp32). MaPLe learns the first `maple_n_ctx` (2) of the ctx_init
    tokens and keeps the rest ("of a") as fixed words, as MaPLe does; its deep prompts are hooks on the encoder layers
    1..J-1 of both towers.

    No official code exists: the re-clustering interval, KL threshold and K-means settings are unpublished and are
    fields here ([design] in the spec). `quantizer='none'` gives the plain host (CoOp, RLP, MaPLe) and
    `quantizer='noise'` the Gaussian-noise baseline.
    """

    host: Literal["coop", "rlp", "maple"] = field(
        default="coop", metadata={"help": "Prompt host: 'coop' (QCoOp), 'rlp' (quantised RLP) or 'maple' (QMaPLe)."}
    )
    quantizer: Literal["kmeans", "uniform", "noise", "none"] = field(
        default="kmeans",
        metadata={"help": "'kmeans' (QPrompt), 'uniform' (min-max STE baseline), 'noise' (Gaussian weight noise in "
                  "training), 'none' (the host method)."},
    )
    bits: int | None = field(default=1, metadata={"help": "Bits per index (1..8) for 'kmeans'/'uniform'."})
    quantize_tensors: list[str] | None = field(
        default=None,
        metadata={"help": "Latent tensors to quantise ('*' wildcards allowed). None: the host's default (coop: "
                  "['ctx']; rlp: ['B']; maple: context, projection, deep text prompts and coupling weights)."},
    )
    normalize: bool = field(default=True, metadata={"help": "z-score the tensor before K-means (spec b.4/b.5)."})
    refit: Literal["cac", "always", "never"] = field(
        default="cac", metadata={"help": "Codebook refits: 'cac' (constrained adaptive clustering), 'always', 'never'."}
    )
    t_min: int = field(default=20, metadata={"help": "CAC minimum number of training steps between fits [design]."})
    kl_threshold: float | None = field(
        default=None,
        metadata={"help": "CAC threshold on KL(current || cached) of the index histograms; None: 3e-4 * (2**bits - 1), "
                  "set from `bits` at creation (a fixed 0.02 never refits 1-2 bit codebooks) [design]."}
    )
    kl_eps: float = field(default=1e-8, metadata={"help": "Added to histogram fractions before the KL [design]."})
    kmeans_max_iter: int = field(default=100, metadata={"help": "Lloyd iterations at most per fit [design]."})
    kmeans_tol: float = field(default=1e-6, metadata={"help": "Stop when no centroid moves more than this."})
    noise_std: float = field(default=0.01, metadata={"help": "Std of the 'noise' baseline (absolute, spec b.3)."})
    save_latents: bool = field(
        default=False,
        metadata={"help": "Also save the fp32 latent tensors (to continue quantisation-aware training exactly)."},
    )
    rlp_rank: int = field(default=1, metadata={"help": "host='rlp': rank r of A (n x r) @ B (r x d)."})
    rlp_dropout: float = field(default=0.1, metadata={"help": "host='rlp': element dropout on A @ B in training."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.QPROMPT
        if self.host not in HOSTS:
            raise ValueError(f"host must be one of {HOSTS}, got {self.host!r}.")
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {self.quantizer!r}.")
        if self.quantizer in ("kmeans", "uniform") and (
                not isinstance(self.bits, int) or isinstance(self.bits, bool) or not 1 <= self.bits <= 8):
            raise ValueError(
                f"bits must be an int in 1..8 for quantizer={self.quantizer!r}, got {self.bits!r} (use "
                "quantizer='none' for the unquantised host)."
            )
        if self.refit not in REFIT_MODES:
            raise ValueError(f"refit must be one of {REFIT_MODES}, got {self.refit!r}.")
        if self.quantize_tensors is not None:
            names = list(self.quantize_tensors)
            if not names or any(not isinstance(n, str) or not n for n in names):
                raise ValueError(
                    f"quantize_tensors must name at least one tensor (or be None for the host default), got {names!r}."
                )
            self.quantize_tensors = names
        if not isinstance(self.t_min, int) or self.t_min < 0:
            raise ValueError(f"t_min must be an int >= 0, got {self.t_min!r}.")
        if self.kl_threshold is None and self.quantizer == "kmeans":
            self.kl_threshold = default_kl_threshold(self.bits)
        if self.kl_threshold is not None and (
                not isinstance(self.kl_threshold, (int, float)) or isinstance(self.kl_threshold, bool)
                or self.kl_threshold < 0):
            raise ValueError(f"kl_threshold must be a number >= 0 (or None for the bit-width default), got "
                             f"{self.kl_threshold!r}.")
        if not isinstance(self.noise_std, (int, float)) or self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std!r}.")
        if self.csc:
            raise ValueError("QPrompt quantises a unified context; csc=True (class-specific context) is not supported.")
        if not isinstance(self.rlp_rank, int) or self.rlp_rank < 1:
            raise ValueError(f"rlp_rank must be a positive int, got {self.rlp_rank!r}.")
        if not isinstance(self.rlp_dropout, (int, float)) or not 0.0 <= self.rlp_dropout < 1.0:
            raise ValueError(f"rlp_dropout must be a probability in [0, 1), got {self.rlp_dropout!r}.")
        if self.host == "rlp" and self.n_ctx is not None and self.rlp_rank > self.n_ctx:
            raise ValueError(f"rlp_rank={self.rlp_rank} exceeds n_ctx={self.n_ctx}.")

    @property
    def deep_prompts(self) -> bool:
        """Deep prompts (`maple_n_ctx`, `prompt_depth`) only with the MaPLe host."""
        return self.host == "maple"

    @property
    def quantized(self) -> bool:
        """True when the saved form is packed indices + codebook."""
        return self.quantizer in ("kmeans", "uniform")

    @property
    def tensor_patterns(self) -> list[str]:
        return list(self.quantize_tensors) if self.quantize_tensors is not None else list(DEFAULT_TENSORS[self.host])
