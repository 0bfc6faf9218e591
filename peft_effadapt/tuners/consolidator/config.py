from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig
from peft.utils import PeftType

from ...peft_hooks import VerifiedAdapterFilesMixin

STORAGE_DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class ConsolidatorConfig(VerifiedAdapterFilesMixin, PeftConfig):
    """Configuration of a [`ConsolidatorModel`] (Hao et al., "Consolidator: Mergeable Adapter with Grouped
    Connections for Visual Adaptation", ICLR 2023).

    Every targeted Linear keeps its frozen weight and gains one trainable grouped-connection branch per entry of
    `fc_groups`. While training, `save_pretrained` stores the branches as they are (a checkpoint reloads the very
    same parameters); after training, `ConsolidatorModel.consolidate()` sums them into one sparse delta per layer whose
    values alone are stored (the form to ship), and `merge_and_unload` adds it into the frozen weight for inference.

    Defaults follow the official release (THU-MIG/Consolidator): one branch with ``hidden_size // 2`` groups, no
    channel shuffle, branch biases on, ``U(-1e-3, 1e-3)`` init, fused-qkv connectivity, block biases and every
    LayerNorm tuned.
    """

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Linear layers to adapt (names, suffixes or a regex). None: the block Linears of the model type "
            "(ViT: q_proj, k_proj, v_proj, o_proj, fc1, fc2; CLIP, both towers: q_proj, k_proj, v_proj, out_proj, "
            "fc1, fc2)."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Names or regex of modules to leave alone."}
    )
    fc_groups: list[int] | int | None = field(
        default=None,
        metadata={
            "help": "Group count of each branch, e.g. [384] (one branch) or [8, 4] (two). None: one branch with "
            "min(in_features, out_features) // 2 groups per layer, i.e. hidden_size // 2 for transformer blocks "
            "(384 on ViT-B, the official setting). Each count must divide the layer's in and out features."
        },
    )
    channel_shuffle: bool | list[bool] = field(
        default=False,
        metadata={"help": "ShuffleNet-style channel reorder before each branch (bool for all, or one per branch)."},
    )
    rep_drop: float = field(
        default=0.0,
        metadata={"help": "DropPath probability applied per sample and per branch during training (official: 0-0.8)."},
    )
    rep_bias: bool = field(
        default=True, metadata={"help": "Give every branch its own trainable bias, dropped with its branch (official)."}
    )
    init_range: float = field(
        default=1e-3,
        metadata={"help": "Branch weights and biases start ~ U(-init_range, init_range); 0 starts at the base model."},
    )
    qkv_grouping: Literal["fused", "separate"] = field(
        default="fused",
        metadata={
            "help": "'fused': q/k/v projections get the connectivity of timm's fused qkv Linear (rows of a virtual "
            "Din -> 3*Dout layer), as in the paper; 'separate': group each projection on its own."
        },
    )
    qkv_names: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj"],
        metadata={"help": "Names of the query, key and value projections, in fused row order (used by 'fused')."},
    )
    train_bias: bool = field(
        default=True, metadata={"help": "Tune the biases of the targeted Linears (stored as bias deltas)."}
    )
    train_layernorm: bool = field(
        default=True, metadata={"help": "Tune every LayerNorm of the model (added to modules_to_save)."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra modules trained and saved in full, e.g. ['classifier']."}
    )
    save_mode: Literal["branches", "consolidated"] = field(
        default="branches",
        metadata={
            "help": "Kept so that configs written by earlier versions load; files now hold the adapter as it is: "
            "the branches while training (exact checkpoints), the consolidated delta after "
            "`ConsolidatorModel.consolidate()`. Setting 'consolidated' in code warns and consolidates nothing."
        },
    )
    consolidated: bool = field(
        default=False,
        metadata={
            "help": "True when the adapter holds the consolidated delta (stage 1): set by "
            "`ConsolidatorModel.consolidate()` and written into the saved adapter_config.json, so every loader builds "
            "one delta vector per layer for the file's values. Leave it False to train branches."
        },
    )
    storage_dtype: Literal["float32", "float16", "bfloat16"] = field(
        default="float32", metadata={"help": "dtype of the stored delta and bias values."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Only adapt these layer indices."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the layer list when layers_to_transform is set, e.g. 'layers'."}
    )
    init_weights: bool = field(
        default=True, metadata={"help": "False: start branches with larger random values (tests of merging only)."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.CONSOLIDATOR
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                setattr(self, name, set(value))
        if self.fc_groups is not None:
            groups = list(self.fc_groups) if isinstance(self.fc_groups, (list, tuple)) else [self.fc_groups]
            if not groups or any(not isinstance(g, int) or isinstance(g, bool) or g < 1 for g in groups):
                raise ValueError(f"fc_groups must be a non-empty list of positive ints, got {self.fc_groups!r}.")
            self.fc_groups = groups
        n_branches = len(self.fc_groups) if self.fc_groups is not None else 1
        if isinstance(self.channel_shuffle, (list, tuple)):
            if len(self.channel_shuffle) != n_branches or not all(isinstance(s, bool) for s in self.channel_shuffle):
                raise ValueError(
                    f"channel_shuffle must be a bool or a list of {n_branches} bools (one per branch), "
                    f"got {self.channel_shuffle!r}."
                )
            self.channel_shuffle = list(self.channel_shuffle)
        elif not isinstance(self.channel_shuffle, bool):
            raise ValueError(f"channel_shuffle must be a bool or a list of bools, got {self.channel_shuffle!r}.")
        if not isinstance(self.rep_drop, (int, float)) or not 0.0 <= self.rep_drop < 1.0:
            raise ValueError(f"rep_drop must be a probability in [0, 1), got {self.rep_drop!r}.")
        if not isinstance(self.init_range, (int, float)) or self.init_range < 0:
            raise ValueError(f"init_range must be >= 0, got {self.init_range!r}.")
        if self.qkv_grouping not in ("fused", "separate"):
            raise ValueError(f"qkv_grouping must be 'fused' or 'separate', got {self.qkv_grouping!r}.")
        if len(self.qkv_names) != 3:
            raise ValueError(f"qkv_names must name the query, key and value projections, got {self.qkv_names!r}.")
        if self.save_mode not in ("consolidated", "branches"):
            raise ValueError(f"save_mode must be 'consolidated' or 'branches', got {self.save_mode!r}.")
        if self.save_mode == "consolidated" and not self.consolidated:
            warnings.warn(
                "ConsolidatorConfig(save_mode='consolidated') no longer consolidates at save time: save_pretrained "
                "writes the branches (exact checkpoints). Call `model.consolidate()` before save_pretrained or "
                "push_adapter_to_hub to store the compact consolidated delta.",
                FutureWarning,
                stacklevel=3,
            )
        if self.storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage_dtype must be one of {STORAGE_DTYPES}, got {self.storage_dtype!r}.")
        if self.layers_pattern and not self.layers_to_transform:
            raise ValueError("layers_pattern is only used together with layers_to_transform.")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        """peft's `from_pretrained`, reading a branch file saved before branch biases were separate parameters too.

        Up to the version that introduced `consolidate()`, an adapter without DropPath kept its branch biases and the
        Linear's bias delta as one vector (`consolidator_bias`): such a file holds branch weights but no branch
        biases, which is exactly the layout of ``rep_bias=False, train_bias=True``; it loads as that, computing the
        same outputs.
        """
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        keys = config.loaded_from.tensors if config.loaded_from is not None else {}
        branch_keys = [key for key in keys if ".consolidator_branches." in key]
        if not config.consolidated and config.rep_bias and branch_keys and not any(
            key.endswith(".bias") for key in branch_keys
        ):
            config.rep_bias, config.train_bias = False, True
        return config

    @property
    def shuffle_flags(self) -> list[bool]:
        n_branches = len(self.fc_groups) if self.fc_groups is not None else 1
        if isinstance(self.channel_shuffle, list):
            return list(self.channel_shuffle)
        return [self.channel_shuffle] * n_branches
