"""The support matrix of docs/support-matrix.md (method x model family), built from the tests' own parametrisation so
that it cannot drift: a "tested" cell exists only because a parametrised test runs that pair, a "refused" cell only
because a test asserts the refusal. `python tests/support_matrix.py` prints the Markdown table;
tests/test_support_matrix.py checks that that page holds exactly that table and that every refusal below is raised."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from method_cases import CASES  # noqa: E402
from test_families import FAMILIES  # noqa: E402
from test_prompting_siglip import CONFIGS as SIGLIP_PROMPT_CONFIGS  # noqa: E402

METHODS = ["Consolidator", "CoOp", "CoCoOp", "RLP", "QPrompt", "MaPLe", "ToMe", "PYRA", "TempMe", "C-SGD", "ResRep"]
COLUMNS = ["ViT / DeiT", "CLIP", "SigLIP", "DINOv2", "MAE", "HF ResNet", "ConvNeXt", "RegNet", "MobileNetV2"]
_METHOD_OF_PREFIX = {m.lower().replace("-", ""): m for m in METHODS}
_FAMILY_OF_TOKEN = {"vit": "ViT / DeiT", "clip": "CLIP", "siglip": "SigLIP", "dinov2": "DINOv2", "mae": "MAE"}

# Pruning families and the tests that run them (the pruning tests are parametrised over HF ResNet layer types; the
# traced families over tests/test_traced_groups.py's FAMILIES, C-SGD and ResRep in each test).
_TRACED = "tests/test_traced_groups.py::test_csgd_and_resrep_slim_exactly_and_reload"
PRUNING_TESTED = {
    ("C-SGD", "HF ResNet"): "tests/test_csgd.py::test_trim_is_lossless_once_clusters_are_identical",
    ("ResRep", "HF ResNet"): "tests/test_resrep.py::test_residual_stream_compactors_are_shared_fold_exactly_and_reload_in_a_fresh_process",
    ("C-SGD", "ViT / DeiT"): "tests/test_pruning_core.py::test_mlp_groups_for_vit_and_clip",
    ("ResRep", "ViT / DeiT"): "tests/test_resrep.py::test_vit_mlp_fold_is_exact",
    **{(method, family): _TRACED for method in ("C-SGD", "ResRep") for family in ("ConvNeXt", "RegNet", "MobileNetV2")},
}
# Refusals, each asserted by a test (tests/test_support_matrix.py runs them all).
REFUSED = {
    ("MaPLe", "SigLIP"): "no class token, attention-pooled: the visual prompts would enter the image feature",
    ("CoCoOp", "SigLIP"): "its per-image forward implements CLIP's head only",
    ("TempMe", "SigLIP"): "CLIP-only (text-video retrieval on CLIP's two towers)",
    ("TempMe", "DINOv2"): "CLIP-only (text-video retrieval on CLIP's two towers)",
}


def _case_pair(case_id: str) -> tuple[str, str] | None:
    tokens = case_id.split("-")
    method = _METHOD_OF_PREFIX.get(tokens[0])
    family = next((_FAMILY_OF_TOKEN[t] for t in tokens[1:] if t in _FAMILY_OF_TOKEN), None)
    return (method, family) if method and family else None


def tested() -> dict[tuple[str, str], str]:
    """(method, family) -> where it is tested."""
    pairs = {}
    for case in CASES:
        pair = _case_pair(case.id)
        if pair:
            pairs.setdefault(pair, f"tests/method_cases.py: {case.id}")
    for key in SIGLIP_PROMPT_CONFIGS:
        pairs.setdefault((_METHOD_OF_PREFIX[key.split("-")[0]], "SigLIP"), f"tests/test_prompting_siglip.py: {key}")
    for key in FAMILIES:
        family = _FAMILY_OF_TOKEN[key.split("-")[0] if key != "vit-mae" else "mae"]
        for method in ("ToMe", "PYRA"):
            pairs.setdefault((method, family), f"tests/test_families.py: {key}")
    pairs.update(PRUNING_TESTED)
    return pairs


def render() -> str:
    done = tested()
    lines = ["| method | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for method in METHODS:
        cells = []
        for family in COLUMNS:
            if (method, family) in done:
                cells.append("tested")
            elif (method, family) in REFUSED:
                cells.append("refused: " + REFUSED[(method, family)])
            else:
                cells.append("–")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
