"""The paper claims re-tested by benchmarks/claims.py, each with the effect its paper reports (for the power column).

`paper` is the reported difference in the claim's metric, in points, on the paper's own benchmark, and `source` says
where it comes from (the spec in /work/shared/papers/ and the paper table it quotes); None where no number was
recovered. `own` names the experiment that reruns both arms on their own papers' recipes (prompt claims).
"""

from __future__ import annotations

from dataclasses import dataclass

_B2N = "11-dataset base-to-novel average, ViT-B/16, 16 shots"


@dataclass(frozen=True)
class Claim:
    """`arm` is claimed better than `baseline` on `metric` (higher is better) in `experiment`."""

    name: str
    experiment: str
    arm: str
    baseline: str
    metric: str
    paper: float | None = None
    source: str = ""
    own: str | None = None


def _prompt(name: str, arm: str, baseline: str, metric: str, paper: float | None, source: str) -> Claim:
    return Claim(name, "prompts", arm, baseline, metric, paper, source, own="prompts_own")


_RLP = "RLP abstract: 'up to +5.25 %' over CoOp, 11-dataset average, metric not stated (rlp.md d.1)"
_NOISE = "QPrompt reports the noise experiment qualitatively only (qprompt.md b.3): no number"
_PYRA_LOW = "PYRA Tab. 1, VTAB-1k mean, ViT-B/16, low compression: 74.69 vs ToMe+LoRA 74.10 (pyra.md d)"
_PYRA_HIGH = "PYRA Tab. 2, VTAB-1k mean, ViT-B/16, high compression: 72.06 vs ToMe+LoRA 70.43 (pyra.md d)"
_LFTL = "LFTL's per-budget tables were not recovered (lftl.md c): no number"

CLAIMS = (
    _prompt("RLP beats CoOp on novel classes at ~1/4 of the parameters", "RLP r=1", "CoOp", "novel", 5.25, _RLP),
    _prompt("RLP beats CoOp on HM at ~1/4 of the parameters", "RLP r=1", "CoOp", "hm", 5.25, _RLP),
    _prompt("QCoOp 1-bit beats CoOp (HM)", "QCoOp 1b", "CoOp", "hm", 5.77,
            f"QPrompt: QCoOp 77.43 vs CoOp 71.66 HM, {_B2N} (qprompt.md d)"),
    _prompt("QCoOp 2-bit beats CoOp (HM)", "QCoOp 2b", "CoOp", "hm", 5.76,
            "QPrompt: QCoOp 1-bit +5.77 HM over CoOp (qprompt.md d), 2-bit 0.01 below 1-bit in its bit ablation "
            "(b.7)"),
    _prompt("QCoOp 1-bit beats noise-CoOp of equal magnitude (HM)", "QCoOp 1b", "noise-CoOp 1b", "hm", None, _NOISE),
    _prompt("QCoOp 2-bit beats noise-CoOp of equal magnitude (HM)", "QCoOp 2b", "noise-CoOp 2b", "hm", None, _NOISE),
    _prompt("CoCoOp beats CoOp on novel classes (its meta-net's purpose)", "CoCoOp", "CoOp", "novel", 8.47,
            f"CoCoOp Tab. 1: novel 71.69 vs CoOp 63.22, {_B2N} (clip_prompt_learning.md d.1)"),
    _prompt("MaPLe beats CoCoOp on HM", "MaPLe", "CoCoOp", "hm", 2.72,
            f"MaPLe Tab. 1: HM 78.55 vs CoCoOp 75.83, {_B2N} (clip_prompt_learning.md d.1)"),
    _prompt("QCoOp 1-bit beats CoCoOp (HM)", "QCoOp 1b", "CoCoOp", "hm", 1.60,
            f"QPrompt: QCoOp 77.43 vs CoCoOp 75.83 HM, {_B2N} (qprompt.md d)"),
    Claim("PYRA beats LoRA+ToMe at equal FLOPs, low compression (ViT)", "pyra_vit", "PYRA low", "LoRA+ToMe low",
          "accuracy", 0.59, _PYRA_LOW),
    Claim("PYRA beats LoRA+ToMe at equal FLOPs, high compression (ViT)", "pyra_vit", "PYRA high", "LoRA+ToMe high",
          "accuracy", 1.63, _PYRA_HIGH),
    Claim("PYRA beats LoRA+ToMe at equal FLOPs, low compression (CLIP vision)", "pyra_clip", "PYRA low",
          "LoRA+ToMe low", "accuracy", 0.59, _PYRA_LOW + "; the paper has no CLIP backbone"),
    Claim("PYRA beats LoRA+ToMe at equal FLOPs, high compression (CLIP vision)", "pyra_clip", "PYRA high",
          "LoRA+ToMe high", "accuracy", 1.63, _PYRA_HIGH + "; the paper has no CLIP backbone"),
    Claim("TempMe+LoRA beats meanP+LoRA on R-Sum at fewer GMACs", "tempme", "TempMe+LoRA", "meanP+LoRA", "t2v_R-Sum",
          5.6, "TempMe, MSRVTT, CLIP B/32: R-Sum 198.6 vs LoRA baseline 193.0 (tempme.md d, secondary sources)"),
    Claim("Consolidator beats LoRA at equal trainable parameters", "consolidator", "Consolidator",
          "LoRA (equal params)", "accuracy", 1.89,
          "Consolidator Tab. 1, VTAB-1k average: 76.53 vs LoRA 74.64 (consolidator.md d)"),
    Claim("LFTL contrastive sampling beats random (mean accuracy over rounds)", "lftl", "contrastive", "random",
          "aubc", None, _LFTL),
    Claim("LFTL contrastive sampling beats entropy (mean accuracy over rounds)", "lftl", "contrastive", "entropy",
          "aubc", None, _LFTL),
    Claim("LFTL contrastive sampling beats margin (mean accuracy over rounds)", "lftl", "contrastive", "margin",
          "aubc", None, _LFTL),
    Claim("ResRep beats L1 + fine-tune at 0.5 FLOPs", "pruning", "ResRep", "L1+fine-tune", "accuracy", None,
          "ResRep reports no L1 + fine-tune row (resrep.md c)"),
    Claim("C-SGD beats L1 + fine-tune at 0.5 FLOPs", "pruning", "C-SGD", "L1+fine-tune", "accuracy", 1.05,
          "nearest row in csgd.md c (no L1 row recovered): ResNet-56 CIFAR-10, C-SGD +0.05 vs Channel Pruning "
          "-1.00 change in top-1"),
)
