"""Model cards from `hub_cards/` and a push that keeps them.

`PeftModel.push_to_hub` (transformers' `PushToHubMixin`) replaces the PEFT model card with a generic one on the first
push. `push_adapter_to_hub` instead saves the adapter, renders our card from its config and the metrics you pass,
checks everything, and only then creates the repo and uploads the folder in one commit.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.utils import HFValidationError, validate_repo_id
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from safetensors import safe_open

CARDS = Path(__file__).resolve().parent / "hub_cards"
UPLOADED_FILES = [CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, "README.md"]


def card_template(peft_type: str) -> Path:
    path = CARDS / f"{peft_type.lower()}.md"
    if not path.is_file():
        known = sorted(p.stem for p in CARDS.glob("*.md"))
        raise ValueError(f"No model-card template for PEFT type {peft_type!r}; templates exist for {known}.")
    return path


def render_model_card(
    adapter_dir: str | Path,
    repo_id: str,
    *,
    metrics: dict[str, Any] | None = None,
    training_data: str | None = None,
    datasets: list[str] | None = None,
    license: str | None = None,
    base_model: str | None = None,
) -> ModelCard:
    """Renders the card of a saved adapter folder: metadata valid for the Hub (library_name peft, base_model, tags
    that name the method), how to load it, the storage size, the data and metrics you pass, and the citation."""
    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / CONFIG_NAME).read_text())
    peft_type = config.get("peft_type")
    if not peft_type:
        raise ValueError(f"{adapter_dir / CONFIG_NAME} has no peft_type: not a PEFT adapter folder.")
    base_model = base_model or config.get("base_model_name_or_path")
    if not base_model:
        raise ValueError(
            "The model card needs the base model: the adapter config has no base_model_name_or_path; pass "
            "base_model='org/name'."
        )
    with safe_open(adapter_dir / SAFETENSORS_WEIGHTS_NAME, framework="pt") as handle:
        tensors = {key: handle.get_slice(key) for key in handle.keys()}  # noqa: SIM118
        stored_values = sum(_numel(s.get_shape()) for s in tensors.values())
    size = (adapter_dir / SAFETENSORS_WEIGHTS_NAME).stat().st_size
    method = peft_type.lower()
    card_data = ModelCardData(
        library_name="peft",
        base_model=base_model,
        license=license,
        datasets=datasets,
        tags=["peft-effadapt", method, f"base_model:adapter:{base_model}"],
    )
    targets = config.get("target_modules")
    return ModelCard.from_template(
        card_data,
        template_path=str(card_template(peft_type)),
        title=f"{peft_type.title()} adapter for {base_model}",
        repo_id=repo_id,
        base_model=base_model,
        base_class=(config.get("auto_mapping") or {}).get("base_model_class", "model"),
        config=_Namespace(config),
        consolidated=config.get("consolidated", False),
        targets=", ".join(sorted(targets)) if isinstance(targets, list) else (targets or "the method's defaults"),
        layernorms=[m for m in (config.get("modules_to_save") or []) if "norm" in m],
        stored_values=f"{stored_values:,}",
        stored_size=_human(size),
        metrics=metrics or {},
        training_data=training_data,
    )


def _checked_repo_and_token(repo_id: str, token: str | None) -> str:
    """The token to upload with, after checking that `repo_id` is a valid 'owner/name'; raises ValueError before
    anything touches the network."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"Malformed repo id {repo_id!r}: {err}") from None
    if "/" not in repo_id:
        raise ValueError(f"Repo id {repo_id!r} must name its owner: 'user-or-org/name'.")
    token = token or get_token()
    if not token:
        raise ValueError("No Hugging Face token: pass token=... or log in (`hf auth login` / HF_TOKEN).")
    return token


def push_adapter_to_hub(
    model,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload adapter with peft_effadapt",
    **card_fields: Any,
) -> str:
    """Saves ``model`` (a ``PeftModel``), renders its card, and uploads adapter_config.json,
    adapter_model.safetensors and README.md in one commit.

    The adapter is uploaded in the form ``save_pretrained`` writes: for Consolidator, call ``model.consolidate()``
    first to ship the compact sparse delta instead of the training branches.

    Args:
        model: The ``PeftModel`` to save and upload.
        repo_id (str): ``"owner/name"`` of the Hub repository (created if missing).
        token (str | None): Hub token; default: the one ``huggingface_hub`` finds.
        private (bool | None): Visibility of a repository this call creates.
        commit_message (str): Message of the upload commit.
        **card_fields: `render_model_card` options (``metrics``, ``training_data``, ``datasets``, ``license``,
            ``base_model``).

    Returns:
        str: The commit URL.

    Raises:
        ValueError: A malformed repo id, no token, or a card that cannot be rendered; raised before anything is
            created or uploaded.
    """
    token = _checked_repo_and_token(repo_id, token)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        card = render_model_card(tmp, repo_id, **card_fields)
        card.save(Path(tmp) / "README.md")
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            repo_id=repo_id, folder_path=tmp, allow_patterns=UPLOADED_FILES, commit_message=commit_message
        )
    return info.commit_url


class _Namespace(dict):
    """Lets templates write ``config.fc_groups`` for a JSON dict."""

    def __getattr__(self, name):
        return self.get(name)


def _numel(shape) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


def _human(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    raise AssertionError


# ------------------------------------------------------------------------------------------------- slimmed models
SLIMMED_FILES = ["config.json", "model.safetensors", "slimming_plan.json", "README.md"]


def render_slimmed_card(directory: str | Path, repo_id: str, *, metrics: dict[str, Any] | None = None,
                        training_data: str | None = None, datasets: list[str] | None = None,
                        license: str | None = None, base_model: str | None = None) -> ModelCard:
    """Card of a folder written by `peft_effadapt.pruning.save_slimmed`: method, FLOPs ratio and widths from the
    slimming plan, parameter count, and how to load it (`load_slimmed`, never `from_pretrained`)."""
    from .pruning.plan import PLAN_NAME, SlimmingPlan

    directory = Path(directory)
    missing = [name for name in SLIMMED_FILES[:3] if not (directory / name).is_file()]
    if missing:
        raise ValueError(f"{directory} is not a slimmed-model folder (missing {missing}); write it with "
                         "peft_effadapt.pruning.save_slimmed.")
    plan = SlimmingPlan.load(directory)
    config = json.loads((directory / "config.json").read_text())
    base_model = base_model or plan.base_model
    with safe_open(directory / "model.safetensors", framework="pt") as handle:
        params = sum(_numel(handle.get_slice(key).get_shape()) for key in handle.keys())  # noqa: SIM118
    method = (plan.method or "pruned").lower()
    tags = ["peft-effadapt", "pruned", method]
    card_data = ModelCardData(library_name="transformers", base_model=base_model or None, license=license,
                              datasets=datasets, tags=tags)
    ratio = plan.metadata.get("flops_ratio")
    return ModelCard.from_template(
        card_data,
        template_path=str(CARDS / "slimmed.md"),
        title=f"{method.upper()}-slimmed {(config.get('architectures') or ['model'])[0]}",
        repo_id=repo_id,
        method=method,
        architecture=(config.get("architectures") or ["?"])[0],
        base_model=base_model,
        flops_ratio=f"{ratio:.3f}" if isinstance(ratio, (int, float)) else "not recorded",
        params=f"{params:,}",
        groups=[(p.group.name, p.group.size, p.width) for p in plan.groups],
        round_to=plan.round_to,
        plan_name=PLAN_NAME,
        metrics=metrics or {},
        training_data=training_data,
    )


def push_slimmed_model_to_hub(
    directory: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload slimmed model with peft_effadapt",
    **card_fields: Any,
) -> str:
    """Uploads a `save_slimmed` folder (config.json, model.safetensors, slimming_plan.json) with a rendered
    README card in one commit; returns the commit URL. Load it with `peft_effadapt.pruning.load_slimmed(repo_id)`.

    Checks the repo id, the token, the folder (the plan must match the weights) and the card before anything is
    created or uploaded."""
    from .pruning.slimmed import load_slimmed

    token = _checked_repo_and_token(repo_id, token)
    directory = Path(directory)
    card = render_slimmed_card(directory, repo_id, **card_fields)
    load_slimmed(directory)  # raises if plan and weights disagree: never publish a folder that cannot be reloaded
    with tempfile.TemporaryDirectory() as tmp:
        for name in SLIMMED_FILES[:3]:
            (Path(tmp) / name).write_bytes((directory / name).read_bytes())
        card.save(Path(tmp) / "README.md")
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo_id, folder_path=tmp, allow_patterns=SLIMMED_FILES,
                                 commit_message=commit_message)
    return info.commit_url
