"""Coupled-channel groups: the output channels that must be pruned together, and every module that reads them.

A group is a set of *producers* whose output channels are the group (conv out-channels, linear rows, with their
biases), the per-channel *norms* that follow them (BatchNorm), and the *consumers* whose input channels are the group
(conv in-channels, linear columns). Producers of one residual stream (stage projection or stem, plus the last conv of
every block) form one residual group; everything else is internal. Groups are found by architecture adapters (HF
ResNet, ViT/CLIP MLPs, plain `nn.Sequential` CNNs) where one applies, else by tracing the model (`tracing.py`: HF
ConvNeXt, RegNet, MobileNetV2 and other CNNs).
"""

from __future__ import annotations

from torch import nn

from .channel_group import ChannelGroup
from .tracing import trace_channel_groups

_CHANNELWISE = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Hardswish,
                nn.Dropout, nn.Dropout2d, nn.Identity, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
                nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def find_channel_groups(model: nn.Module, example_inputs=None) -> list[ChannelGroup]:
    """Channel groups of HF `ResNetForImageClassification`/`ResNetModel`, ViT/CLIP MLPs (any module with `fc1`/`fc2`
    Linears, or the 4.x `intermediate.dense`/`output.dense` pair) and plain `nn.Sequential` CNNs by their rules;
    any other model (HF ConvNeXt, RegNet, MobileNetV2, custom CNNs) by tracing it with `torch.export` on
    `example_inputs` (default: one image from the config; see `tracing.trace_channel_groups`).

    Raises `ValueError` when no group is found (nothing to prune), or naming the op tracing cannot follow."""
    groups = _resnet_groups(model) + _mlp_groups(model)
    if not groups and isinstance(model, nn.Sequential):
        groups = _sequential_groups(model)
    if not groups:
        groups = trace_channel_groups(model, example_inputs)
    if not groups:
        raise ValueError(
            f"No prunable channel groups found in {type(model).__name__}: no conv/linear output is read by another "
            "conv/linear (rules cover HF ResNet, ViT/CLIP MLPs and nn.Sequential CNNs; other models are traced)."
        )
    return groups


# --------------------------------------------------------------------------------------------------- HF ResNet
def _resnet_groups(model: nn.Module) -> list[ChannelGroup]:
    from transformers.models.resnet.modeling_resnet import ResNetModel, ResNetShortCut

    found = [(n, m) for n, m in model.named_modules() if isinstance(m, ResNetModel)]
    if not found:
        return []
    prefix, resnet = found[0]
    prefix = f"{prefix}." if prefix else ""
    head = _resnet_head(model, prefix)
    internal: list[ChannelGroup] = []
    residual: list[ChannelGroup] = []
    stem = f"{prefix}embedder.embedder"
    stream = None  # the open residual stream: producers, norms, consumers, size
    for s, stage in enumerate(resnet.encoder.stages):
        for i, layer in enumerate(stage.layers):
            base = f"{prefix}encoder.stages.{s}.layers.{i}"
            convs = [f"{base}.layer.{k}" for k in range(len(layer.layer))]
            first_in = f"{convs[0]}.convolution"
            if i == 0 and isinstance(layer.shortcut, ResNetShortCut):
                readers = [f"{base}.shortcut.convolution", first_in]
                if stream is not None:  # the previous stage's stream ends here
                    stream["consumers"] += readers
                    residual.append(_close(stream))
                else:  # stem output feeds only this projection and the first conv
                    internal.append(ChannelGroup(
                        "stem", [(f"{stem}.convolution", "conv")], [f"{stem}.normalization"], readers,
                        resnet.config.embedding_size, meta={"role": "stem"}))
                stream = _open(f"stage{s}", [f"{base}.shortcut"])
            else:
                if stream is None:  # stage 0 without projection: the stem output *is* the stream
                    stream = _open(f"stage{s}", [stem])
                stream["consumers"].append(first_in)
            for k in range(len(convs) - 1):  # internal convs: all but the last of the block
                conv = model.get_submodule(f"{convs[k]}.convolution")
                internal.append(ChannelGroup(
                    f"stage{s}.layer{i}.conv{k}", [(f"{convs[k]}.convolution", "conv")],
                    [f"{convs[k]}.normalization"], [f"{convs[k + 1]}.convolution"], conv.out_channels,
                    meta={"role": "block"}))
            stream["producers"].append((f"{convs[-1]}.convolution", "conv"))
            stream["norms"].append(f"{convs[-1]}.normalization")
            stream["size"] = model.get_submodule(f"{convs[-1]}.convolution").out_channels
    if stream is not None:
        if head is None:
            residual.append(_close(stream, reaches_output=True))
        else:
            stream["consumers"].append(head)
            residual.append(_close(stream))
    return internal + residual


def _open(name: str, leaders: list[str]) -> dict:
    producers = [(f"{p}.convolution", "conv") for p in leaders]
    return {"name": name, "producers": producers, "norms": [f"{p}.normalization" for p in leaders],
            "consumers": [], "size": 0}


def _close(stream: dict, reaches_output: bool = False) -> ChannelGroup:
    return ChannelGroup(stream["name"], stream["producers"], stream["norms"], stream["consumers"], stream["size"],
                        residual=True, reaches_output=reaches_output)


def _resnet_head(model: nn.Module, prefix: str) -> str | None:
    classifier = getattr(model, "classifier", None) if not prefix or prefix == "resnet." else None
    if isinstance(classifier, nn.Sequential):
        for j, sub in enumerate(classifier):
            if isinstance(sub, nn.Linear):
                return f"classifier.{j}"
    if isinstance(classifier, nn.Linear):
        return "classifier"
    return None


# --------------------------------------------------------------------------------------------------- MLPs
def _mlp_groups(model: nn.Module) -> list[ChannelGroup]:
    groups = []
    for name, module in model.named_modules():
        pre = f"{name}." if name else ""
        fc1, fc2 = getattr(module, "fc1", None), getattr(module, "fc2", None)
        pair = None
        if isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear):
            pair = (f"{pre}fc1", f"{pre}fc2", fc1)
        else:  # transformers 4.x ViT layer: intermediate.dense -> output.dense
            inter, out = getattr(module, "intermediate", None), getattr(module, "output", None)
            d1, d2 = getattr(inter, "dense", None), getattr(out, "dense", None)
            if isinstance(d1, nn.Linear) and isinstance(d2, nn.Linear) and d1.out_features == d2.in_features:
                pair = (f"{pre}intermediate.dense", f"{pre}output.dense", d1)
        if pair is None:
            continue
        act = getattr(module, "activation_fn", None) or getattr(getattr(module, "intermediate", None),
                                                                 "intermediate_act_fn", None)
        groups.append(ChannelGroup(name, [(pair[0], "linear")], [], [pair[1]], pair[2].out_features,
                                   meta={"role": "mlp", "activation": type(act).__name__}))
    return groups


# --------------------------------------------------------------------------------------------------- nn.Sequential
def _sequential_groups(model: nn.Sequential) -> list[ChannelGroup]:
    leaves = list(_flatten(model, ""))
    groups = []
    for idx, (path, module) in enumerate(leaves):
        if not isinstance(module, (*_CONVS, nn.Linear)) or _is_depthwise(module) or _is_grouped(module):
            continue
        size = module.out_channels if isinstance(module, _CONVS) else module.out_features
        kind = "conv" if isinstance(module, _CONVS) else "linear"
        producers, norms, consumer, ok = [(path, kind)], [], None, True
        for nxt_path, nxt in leaves[idx + 1:]:
            if isinstance(nxt, _NORMS):
                norms.append(nxt_path)
            elif isinstance(nxt, _CONVS) and _is_depthwise(nxt) and nxt.in_channels == size:
                producers.append((nxt_path, "depthwise"))
            elif isinstance(nxt, (*_CONVS, nn.Linear)):
                in_dim = nxt.in_channels if isinstance(nxt, _CONVS) else nxt.in_features
                ok = not _is_grouped(nxt) and in_dim % size == 0 and (isinstance(nxt, nn.Linear) or in_dim == size)
                consumer = nxt_path
                break
            elif not isinstance(nxt, (*_CHANNELWISE, nn.Flatten)):
                ok = False
                break
        if ok and consumer is not None:
            groups.append(ChannelGroup(path, producers, norms, [consumer], size, meta={"role": "block"}))
    return groups


def _flatten(module: nn.Module, prefix: str):
    for name, child in module.named_children():
        path = f"{prefix}{name}"
        if isinstance(child, nn.Sequential):
            yield from _flatten(child, f"{path}.")
        else:
            yield path, child


def _is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, _CONVS) and module.groups > 1 and module.groups == module.in_channels == \
        module.out_channels


def _is_grouped(module: nn.Module) -> bool:
    return isinstance(module, _CONVS) and module.groups > 1 and not _is_depthwise(module)


# --------------------------------------------------------------------------------------------------- selection
GROUP_FAMILIES = ("internal", "streams", "all")


def family_of(group: ChannelGroup) -> str:
    """"internal" (layers inside a block or MLP: one producer, no residual add — ResRep's setting) or "streams"
    (residual streams, whose producers are coupled through the adds, and the stem)."""
    return "streams" if group.residual or group.meta.get("role") == "stem" else "internal"


def select_groups(groups: list[ChannelGroup], spec) -> list[ChannelGroup]:
    """The prunable groups chosen by `spec`: a family ("internal", "streams", "all"), a list of glob patterns on
    group names / first producer paths, or a list of `ChannelGroup` (used as given). Raises `ValueError` when the
    spec is malformed, names an output group, or matches nothing."""
    if isinstance(spec, str):
        if spec not in GROUP_FAMILIES:
            raise ValueError(f"groups must be one of {GROUP_FAMILIES}, a list of glob patterns or a list of "
                             f"ChannelGroup; got {spec!r}.")
        chosen = [g for g in groups if g.prunable and (spec == "all" or family_of(g) == spec)]
    elif isinstance(spec, (list, tuple)) and all(isinstance(p, ChannelGroup) for p in spec) and spec:
        chosen = list(spec)
    elif isinstance(spec, (list, tuple)) and all(isinstance(p, str) for p in spec) and spec:
        import fnmatch

        chosen = [g for g in groups if any(fnmatch.fnmatchcase(g.name, p) or
                                           fnmatch.fnmatchcase(g.producers[0][0], p) for p in spec)]
    else:
        raise ValueError(f"groups must be one of {GROUP_FAMILIES}, a non-empty list of glob patterns or a list of "
                         f"ChannelGroup; got {spec!r}.")
    refused = {g.name: g.refusal for g in chosen if not g.prunable}
    if refused:
        raise ValueError(f"Groups cannot be pruned: {refused}.")
    if not chosen:
        raise ValueError(f"Nothing to prune: no channel group matches groups={spec!r} (groups found: "
                         f"{[g.name for g in groups]}).")
    return chosen
