from __future__ import annotations

from torch import nn

from ...merging import TokenMergingModel
from .config import PYRAConfig
from .layer import PYRABlock, PYRALayer


class PYRAModel(TokenMergingModel):
    """PYRA (Xiong et al., ECCV 2024): LoRA on q/k/v + ToMe token merging + parallel yielding re-activation.

    Built by peft from a [`PYRAConfig`] on a ViT, DeiT, CLIP or SigLIP vision tower, DINOv2 or MAE encoder (the
    families of the [support matrix](../support-matrix.md), subclasses included). Saved per layer: ``pyra_lora_A``
    (r×D, or 3r×D unshared), ``pyra_lora_B`` (3D×r) and, where r_l > 0, ``pyra_w_r`` (r_l×1), ``pyra_w_d`` (1×D),
    ``pyra_norm``; the resolved schedule goes to the config. ``merge_and_unload`` folds LoRA into q/k/v and returns the
    base class **still merging** with the PYRA modulation (a patched model; `unload` gives the plain one).

    Example:
        ```python
        from peft import get_peft_model
        from peft_effadapt import PYRAConfig
        from peft_effadapt.testing import load_tiny_vit

        model = get_peft_model(load_tiny_vit()[0], PYRAConfig(merge_schedule="low", modules_to_save=["classifier"]))
        print(model.base_model.planned_token_counts())  # tokens entering each layer, then the output
        ```
    """

    method_name = "PYRA"
    prefix: str = "pyra_"
    tuner_layer_cls = PYRALayer
    block_cls = PYRABlock
    _shapes_depend_on_tokens = True

    def _layer_kwargs(self, config: PYRAConfig) -> dict:
        return dict(
            lora_r=config.lora_r,
            lora_dropout=config.lora_dropout,
            lora_scale=config.lora_scale,
            lora_shared_qkv_a=config.lora_shared_qkv_a,
            eps=config.pyra_layernorm_eps,
            init_weights=config.init_weights,
        )


def pyra_param_groups(model: nn.Module, lr: float, weight_decay: float = 1e-4, pyra_lr: float | None = None) -> list:
    """AdamW parameter groups in the official recipe.

    Trainable tensors get weight decay except 1-D ones (biases, LayerNorms); PYRA's W_r / W_D / LayerNorm train at
    `pyra_lr`.

    Args:
        model (nn.Module): The PEFT model (its trainable parameters are grouped).
        lr (float): Learning rate of LoRA and every other trained tensor.
        weight_decay (float): Decay of the tensors with more than one dimension.
        pyra_lr (float | None): Learning rate of PYRA's own tensors; None takes the adapter config's `pyra_lr`,
            else `lr` (which is what the official runs effectively used: their `--pyra_lr` never took effect).

    Returns:
        list[dict]: Parameter groups for `torch.optim.AdamW`.
    """
    if pyra_lr is None:
        configs = getattr(model, "peft_config", {})
        pyra_lr = next((c.pyra_lr for c in configs.values() if getattr(c, "pyra_lr", None) is not None), None)
    pyra_lr = lr if pyra_lr is None else pyra_lr
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_pyra = any(f".{key}." in name for key in ("pyra_w_r", "pyra_w_d", "pyra_norm"))
        decay = param.ndim > 1 and not name.endswith(".bias")
        groups.setdefault((is_pyra, decay), []).append(param)
    return [
        {"params": params, "lr": pyra_lr if is_pyra else lr, "weight_decay": weight_decay if decay else 0.0}
        for (is_pyra, decay), params in groups.items()
    ]
