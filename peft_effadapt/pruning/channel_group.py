"""One set of coupled channels (`ChannelGroup`): the record that group finding (`groups.py` by rules, `tracing.py` by
tracing) produces and that plans, FLOPs models and the pruning callbacks read."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

PRODUCER_KINDS = ("conv", "linear", "depthwise")


@dataclass
class ChannelGroup:
    """One set of coupled channels.

    Args:
        name: stable identifier (used as key in plans and callback state).
        producers: `(module_path, kind)` pairs; kind is "conv", "linear" or "depthwise" (a depthwise conv whose
            input *and* output channels are the group: it rides along with the producer before it).
        norms: paths of BatchNorm modules on the group's channels.
        consumers: paths of modules whose input channels are the group. A Linear consumer after a flatten owns
            `in_features // size` contiguous features per channel (NCHW flatten).
        size: number of channels.
        residual: True for a residual stream (all producers must keep the same channels); False = internal.
        reaches_output: True if the channels are part of the model's output (never prunable).
        meta: free-form details: "role" ("stem", "block", "stream"), and for groups that cannot be pruned exactly
            "unprunable" (the reason, e.g. "LayerNorm over channels at <path>"; see `tracing.py`).
        channel_params: parameters/buffers (full names) holding one value per channel of the group, sliced with it
            (e.g. a ConvNeXt-style layer scale).
    """

    name: str
    producers: list[tuple[str, str]]
    norms: list[str]
    consumers: list[str]
    size: int
    residual: bool = False
    reaches_output: bool = False
    meta: dict = field(default_factory=dict)
    channel_params: list[str] = field(default_factory=list)

    @property
    def internal(self) -> bool:
        """Safe to prune with a per-layer method (ResRep's setting): one stream, not coupled through a residual add."""
        return not self.residual and self.prunable

    @property
    def prunable(self) -> bool:
        """False for output channels and for groups refused with a reason (`meta["unprunable"]`)."""
        return not self.reaches_output and not self.meta.get("unprunable")

    @property
    def refusal(self) -> str | None:
        """Why the group cannot be pruned (None when it can)."""
        if self.reaches_output:
            return "carries the model's output channels"
        return self.meta.get("unprunable") or None

    @property
    def pacesetter(self) -> str:
        """The producer whose weights decide for the whole group (C-SGD clusters it; the others follow)."""
        return self.producers[0][0]

    def to_dict(self) -> dict:
        data = asdict(self)
        data["producers"] = [list(p) for p in self.producers]
        if not data["channel_params"]:  # plans of groups without them keep their original form
            del data["channel_params"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> ChannelGroup:
        data = dict(data)
        data["producers"] = [tuple(p) for p in data["producers"]]
        return cls(**data)
