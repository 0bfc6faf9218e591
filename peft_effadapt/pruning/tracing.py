"""Coupled-channel groups found by tracing: `torch.export` records the model's aten graph, and channel spaces are
propagated over it.

A conv or linear creates a new channel space (its producer); BatchNorm, activations, dropout, pooling, padding,
spatial means, permutes, flattens and multiplies by a per-channel parameter (layer scale) carry a space along; a
depthwise conv rides along (kind "depthwise"); an elementwise add/sub/mul/div of two spaces unifies them (a residual
add makes a residual group; a squeeze-excitation multiply makes the SE expand conv a producer of the block's group and
the SE reduce conv a consumer). Consumers are the convs/linears reading a space.

Refused groups (listed, with `meta["unprunable"]` saying why, never pruned): spaces normalised across channels
(LayerNorm / GroupNorm, or any reduction over the channel dim: removing a channel changes every other one), spaces
read or written by a grouped (non-depthwise) conv (a conv group mixes only its own channels, so one channel cannot
go alone; pruning whole conv groups is not implemented), and spaces that contain the model input. Channels that
reach the model's outputs are `reaches_output`. Any other op touching a channel space raises `ValueError` naming
the aten op and the module it ran in.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .channel_group import ChannelGroup

# ops that carry channels unchanged, elementwise (unary, or with scalars / broadcast tensors)
_ELEMENTWISE = {
    "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "gelu", "gelu_", "silu", "silu_", "sigmoid", "sigmoid_",
    "tanh", "tanh_", "hardswish", "hardswish_", "hardsigmoid", "hardsigmoid_", "leaky_relu", "leaky_relu_", "elu",
    "elu_", "mish", "mish_", "softplus", "clamp", "clamp_", "clamp_min", "clamp_max", "dropout", "dropout_",
    "feature_dropout", "alpha_dropout", "neg", "abs", "exp", "sqrt", "rsqrt", "erf", "square", "reciprocal", "pow",
    "clone", "contiguous", "detach", "alias", "_to_copy", "to", "lift_fresh_copy", "type_as",
    "add", "add_", "sub", "sub_", "rsub", "mul", "mul_", "div", "div_", "maximum", "minimum", "where",
}
_JOIN_RESIDUAL = {"add", "add_", "sub", "sub_", "rsub"}
_TUPLE_CARRY = {"native_dropout", "max_pool1d_with_indices", "max_pool2d_with_indices", "max_pool3d_with_indices"}
_POOLS = {"max_pool1d": 1, "max_pool2d": 2, "max_pool3d": 3, "avg_pool1d": 1, "avg_pool2d": 2, "avg_pool3d": 3,
          "adaptive_avg_pool1d": 1, "adaptive_avg_pool2d": 2, "adaptive_avg_pool3d": 3, "adaptive_max_pool1d": 1,
          "adaptive_max_pool2d": 2, "adaptive_max_pool3d": 3, "max_pool1d_with_indices": 1,
          "max_pool2d_with_indices": 2, "max_pool3d_with_indices": 3, "_adaptive_avg_pool2d": 2,
          "upsample_nearest2d": 2, "upsample_bilinear2d": 2}
_RESHAPES = {"view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "squeeze_", "unsqueeze",
             "unsqueeze_", "expand", "expand_as"}
_REDUCTIONS = {"mean", "sum", "amax", "amin", "var", "std", "var_mean", "std_mean", "logsumexp", "norm"}
_BATCHNORMS = {"batch_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit", "native_batch_norm",
               "_batch_norm_with_update", "_batch_norm_no_update", "cudnn_batch_norm"}
_CONVS = {"conv1d", "conv2d", "conv3d", "convolution", "_convolution"}
_SHAPE_ONLY = {"zeros_like", "ones_like", "empty_like", "full_like", "sym_size", "size", "dim"}


@dataclass(frozen=True)
class _Ch:
    """A tensor holding channel space `space` along `dim`; `mult` consecutive elements per channel along that dim
    (> 1 after flattening trailing dims into it); `src` the producer whose output this is (for its BatchNorm)."""

    space: int
    dim: int
    mult: int = 1
    src: str | None = None


@dataclass(frozen=True)
class _Param:
    """A tensor derived by views from a parameter/buffer/constant `fqn`."""

    fqn: str


class _Spaces:
    def __init__(self):
        self.parent: list[int] = []
        self.size: list[int] = []
        self.producers: dict[int, list[tuple[int, str, str]]] = {}  # (order, path, kind)
        self.consumers: dict[int, list[str]] = {}
        self.params: dict[int, list[str]] = {}
        self.reasons: dict[int, list[str]] = {}
        self.flags: dict[int, set[str]] = {}
        self.stem: set[str] = set()

    def new(self, size: int) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[max(a, b)] = min(a, b)
        return min(a, b)

    def add(self, table: dict, space: int, item) -> None:
        table.setdefault(space, []).append(item)


def trace_channel_groups(model: nn.Module, example_inputs=None) -> list[ChannelGroup]:
    """Coupled-channel groups of `model` found over its `torch.export` graph (eval mode, no grad); see the module
    docstring for the rules. `example_inputs`: a tensor, tuple of positional inputs or dict of keyword inputs
    (default: one image from the HF config, or from the first conv/linear's input width). Returns only groups that
    some layer reads or that are refused (with the reason in `meta["unprunable"]`)."""
    program = _export(model, example_inputs)
    graph, signature = program.graph_module.graph, program.graph_signature
    fqn_of = {**signature.inputs_to_parameters, **signature.inputs_to_buffers,
              **getattr(signature, "inputs_to_lifted_tensor_constants", {})}
    spaces = _Spaces()
    info: dict[str, object] = {}
    norm_of: dict[str, list[str]] = {}  # producer path -> its BatchNorms
    orphan_norms: dict[int, list[str]] = {}
    producer_space: dict[str, int] = {}
    consumer_space: dict[str, int] = {}
    order = {node.name: i for i, node in enumerate(graph.nodes)}

    def get(arg):
        return info.get(arg.name) if isinstance(arg, torch.fx.Node) else None

    def module_of(node) -> str:
        stack = node.meta.get("nn_module_stack") or {}
        return (list(stack.values())[-1][0] if stack else "") or "<top level>"

    def param_path(arg, node, role: str) -> str:
        if not isinstance(arg, torch.fx.Node) or arg.name not in fqn_of:
            raise ValueError(f"Channel tracing: the {role} of {_op(node)} at {module_of(node)!r} is not a module "
                             "parameter (a functional call with a computed weight); this graph is not supported.")
        return fqn_of[arg.name].rpartition(".")[0]

    def produce(path: str, kind: str, size: int, reads, node) -> _Ch:
        space = spaces.new(size)
        if path in producer_space:  # a module called twice produces the same channels each time
            space = spaces.union(space, producer_space[path])
        producer_space[path] = space
        if not any(p == path for _, p, _ in spaces.producers.get(space, [])):
            position = order[reads.name] if isinstance(reads, torch.fx.Node) else -1
            spaces.add(spaces.producers, space, (position, path, kind))
        if get(reads) is None:
            spaces.stem.add(path)
        return _Ch(space, len(_shape(node)) - 1 if kind == "linear" else 1, 1, path)

    def consume(ch: _Ch, path: str) -> None:
        if path in consumer_space:  # called twice: both inputs are its input channels
            spaces.union(consumer_space[path], ch.space)
        else:
            spaces.add(spaces.consumers, ch.space, path)
        consumer_space[path] = ch.space

    def refuse(ch: _Ch, reason: str) -> None:
        spaces.add(spaces.reasons, ch.space, reason)

    for node in graph.nodes:
        if node.op == "placeholder":
            if node.name in fqn_of:
                info[node.name] = _Param(fqn_of[node.name])
            continue
        if node.op == "output":
            for arg in torch.utils._pytree.tree_leaves(node.args):
                ch = get(arg)
                if isinstance(ch, _Ch):
                    spaces.flags.setdefault(ch.space, set()).add("output")
            continue
        if node.op != "call_function":
            continue
        if node.target is operator.getitem:
            parent = get(node.args[0])
            info[node.name] = parent[node.args[1]] if isinstance(parent, tuple) else None
            continue
        op = _packet(node)
        tensors = [a for a in torch.utils._pytree.tree_leaves((node.args, node.kwargs)) if isinstance(a, torch.fx.Node)]
        channels = [get(a) for a in tensors if isinstance(get(a), _Ch)]
        where = module_of(node)
        if op in _CONVS:
            x, weight = node.args[0], node.args[1]
            path = param_path(weight, node, "weight")
            groups = _arg(node, 8 if op in ("convolution", "_convolution") else 6, "groups", 1)
            if op in ("convolution", "_convolution") and _arg(node, 6, "transposed", False):
                _unknown(node, where, "transposed convolutions are not supported")
            ch, shape_in, shape_out = get(x), _shape(x), _shape(node)
            if isinstance(ch, _Ch) and (ch.dim != 1 or ch.mult != 1):
                _unknown(node, where, "the channel space is not on dim 1")
            depthwise = groups > 1 and groups == shape_in[1] == shape_out[1]
            if depthwise and isinstance(ch, _Ch):
                spaces.add(spaces.producers, ch.space, (order[x.name], path, "depthwise"))
                producer_space[path] = ch.space
                info[node.name] = _Ch(ch.space, 1, 1, path)
                continue
            out = produce(path, "conv", shape_out[1], x, node)
            if groups > 1:
                why = f"grouped conv at {path} (groups={groups})"
                refuse(out, why)
                if isinstance(ch, _Ch):
                    refuse(ch, why)
            elif isinstance(ch, _Ch):
                consume(ch, path)
            info[node.name] = out
        elif op == "linear":
            x = node.args[0]
            path = param_path(node.args[1], node, "weight")
            ch = get(x)
            if isinstance(ch, _Ch):
                if ch.dim != len(_shape(x)) - 1:
                    _unknown(node, where, f"the channels are on dim {ch.dim}, not the last one")
                consume(ch, path)
            info[node.name] = produce(path, "linear", _shape(node)[-1], x, node)
        elif op in _BATCHNORMS:
            ch = get(node.args[0])
            result = ch
            if isinstance(ch, _Ch):
                if ch.dim != 1 or ch.mult != 1:
                    _unknown(node, where, "BatchNorm over a dim that is not the channel dim")
                path = next((fqn_of[a.name].rpartition(".")[0] for a in node.args[1:5]
                             if isinstance(a, torch.fx.Node) and a.name in fqn_of), where)
                if ch.src is not None:
                    norm_of.setdefault(ch.src, []).append(path)
                else:
                    orphan_norms.setdefault(ch.space, []).append(path)
            if isinstance(node.meta.get("val"), (tuple, list)):
                result = (ch,) + (None,) * (len(node.meta["val"]) - 1)
            info[node.name] = result
        elif op in ("layer_norm", "native_layer_norm", "group_norm", "native_group_norm"):
            ch = get(node.args[0])
            if isinstance(ch, _Ch):
                ndim = len(_shape(node.args[0]))
                over = len(node.args[1]) if op.endswith("layer_norm") else ndim - 1
                if ch.dim >= ndim - over:
                    kind = "LayerNorm" if op.endswith("layer_norm") else "GroupNorm"
                    refuse(ch, f"{kind} over channels at {where}")
            result = ch
            if isinstance(node.meta.get("val"), (tuple, list)):
                result = (ch,) + (None,) * (len(node.meta["val"]) - 1)
            info[node.name] = result
        elif not channels:  # no channel space here: at most a view of one parameter (layer scale, norm weight)
            params = [get(a) for a in tensors if isinstance(get(a), _Param)]
            views = _ELEMENTWISE | _RESHAPES | {"permute", "transpose", "t", "slice", "select"}
            info[node.name] = params[0] if op in views and len(params) == 1 and len(tensors) == 1 else None
        elif op in _SHAPE_ONLY:
            info[node.name] = None
        elif op in _ELEMENTWISE:
            info[node.name] = _elementwise(node, op, tensors, get, spaces, where)
        elif op in _TUPLE_CARRY or op in _POOLS:
            ch = get(node.args[0])
            if isinstance(ch, _Ch) and op in _POOLS and ch.dim >= len(_shape(node.args[0])) - _POOLS[op]:
                _unknown(node, where, "pooling over the channel dim")
            info[node.name] = (ch, None) if op in _TUPLE_CARRY else ch
        elif op in ("pad", "constant_pad_nd"):
            ch = get(node.args[0])
            if isinstance(ch, _Ch) and ch.dim >= len(_shape(node.args[0])) - len(node.args[1]) // 2:
                _unknown(node, where, "padding along the channel dim")
            info[node.name] = ch
        elif op in ("permute", "transpose", "t", "numpy_T"):
            info[node.name] = _permute(node, op, get(node.args[0]))
        elif op in _RESHAPES:
            info[node.name] = _reshape(node, get(node.args[0]), where)
        elif op in _REDUCTIONS:
            ch = get(node.args[0])
            ndim = len(_shape(node.args[0]))
            dims = _arg(node, 1, "dim", None)
            dims = list(range(ndim)) if dims is None or dims == [] else [dims] if isinstance(dims, int) else dims
            dims = sorted(d % ndim for d in dims)
            if ch.dim in dims:
                refuse(ch, f"reduction over channels ({op}) at {where}")
                info[node.name] = None
            else:
                keep = len(_shape(node)) == ndim
                info[node.name] = _Ch(ch.space, ch.dim if keep else ch.dim - sum(d < ch.dim for d in dims),
                                      ch.mult, ch.src)
        elif op in ("slice", "select"):
            ch = get(node.args[0])
            ndim = len(_shape(node.args[0]))
            dim = _arg(node, 1, "dim", 0) % ndim
            if dim == ch.dim:
                _unknown(node, where, "indexing along the channel dim")
            info[node.name] = _Ch(ch.space, ch.dim - (op == "select" and dim < ch.dim), ch.mult, ch.src)
        else:
            _unknown(node, where)
    return _groups(model, spaces, norm_of, orphan_norms, ChannelGroup)


def _groups(model, spaces: _Spaces, norm_of, orphan_norms, channel_group) -> list:
    members: dict[int, list[int]] = {}
    for i in range(len(spaces.parent)):
        members.setdefault(spaces.find(i), []).append(i)
    groups = []
    for root, ids in members.items():
        producers = sorted(p for i in ids for p in spaces.producers.get(i, []))
        if not producers:
            continue
        consumers = list(dict.fromkeys(c for i in ids for c in spaces.consumers.get(i, [])))
        reasons = list(dict.fromkeys(r for i in ids for r in spaces.reasons.get(i, [])))
        flags = set().union(*(spaces.flags.get(i, set()) for i in ids))
        if not consumers and not reasons:
            continue  # nothing inside the model reads these channels (the logits): nothing to prune
        paths = [(path, kind) for _, path, kind in producers]
        norms = [n for path, _ in paths for n in norm_of.get(path, [])]
        norms += [n for i in ids for n in orphan_norms.get(i, [])]
        params = list(dict.fromkeys(p for i in ids for p in spaces.params.get(i, [])))
        size = spaces.size[root]
        meta = {"role": "stem" if paths[0][0] in spaces.stem else "stream" if "residual" in flags else "block",
                "traced": True}
        if "mul" in flags:
            meta["coupled_by"] = "mul"
        if reasons:
            meta["unprunable"] = "; ".join(reasons)
        for fqn in params:
            module, _, name = fqn.rpartition(".")
            tensor = getattr(model.get_submodule(module), name)
            if tensor.numel() != size:
                meta.setdefault("unprunable", f"per-channel tensor {fqn} of shape {tuple(tensor.shape)}")
        groups.append((producers[0][0], channel_group(
            paths[0][0], paths, norms, consumers, size, residual="residual" in flags,
            reaches_output="output" in flags, meta=meta, channel_params=params)))
    return [g for _, g in sorted(groups, key=lambda item: item[0])]  # graph order of the pacesetters' inputs


# --------------------------------------------------------------------------------------------------- op rules
def _elementwise(node, op, tensors, get, spaces: _Spaces, where):
    out_shape = _shape(node)
    out_nd = len(out_shape)
    chans = [(a, get(a)) for a in tensors if isinstance(get(a), _Ch)]
    aligned = {ch.dim + out_nd - len(_shape(a)) for a, ch in chans}
    sizes = {(_shape(a)[ch.dim], ch.mult) for a, ch in chans}
    if len(aligned) != 1 or len(sizes) != 1:
        _unknown(node, where, "its channel inputs do not line up on one dim")
    dim = aligned.pop()
    first = chans[0][1]
    roots = {spaces.find(ch.space) for _, ch in chans}
    for a in tensors:
        value = get(a)
        if isinstance(value, _Ch):
            continue
        shape = _shape(a)
        at = dim - (out_nd - len(shape))
        if at < 0 or shape[at] == 1:
            continue  # broadcast over the channels (a scalar, a spatial mean, a mask)
        if not isinstance(value, _Param):
            _unknown(node, where, "it mixes a channel space with a per-channel tensor that is not a parameter")
        for root in roots:
            spaces.add(spaces.params, root, value.fqn)
    space = first.space
    for root in roots:
        space = spaces.union(space, root)
    if len(roots) > 1:
        spaces.flags.setdefault(space, set()).add("residual" if op in _JOIN_RESIDUAL else "mul")
    src = first.src if len(chans) == 1 else None
    return _Ch(space, dim, first.mult, src)


def _permute(node, op, ch):
    ndim = len(_shape(node.args[0]))
    if op == "permute":
        dims = [d % ndim for d in node.args[1]]
        return _Ch(ch.space, dims.index(ch.dim), ch.mult, ch.src)
    a, b = (node.args[1] % ndim, node.args[2] % ndim) if op == "transpose" else (0, 1)
    return _Ch(ch.space, b if ch.dim == a else a if ch.dim == b else ch.dim, ch.mult, ch.src)


def _reshape(node, ch, where):
    shape_in, shape_out = _shape(node.args[0]), _shape(node)
    if _packet(node) in ("expand", "expand_as"):
        return _Ch(ch.space, ch.dim + len(shape_out) - len(shape_in), ch.mult, ch.src)
    before, extent = math.prod(shape_in[:ch.dim]), shape_in[ch.dim]
    for o in range(len(shape_out)):
        if math.prod(shape_out[:o]) == before and (shape_out[o] != 1 or extent == 1):
            break
    else:
        _unknown(node, where, "it merges the channel dim with a dim before it")
    got = shape_out[o]
    if got == extent:
        return _Ch(ch.space, o, ch.mult, ch.src)
    if got > extent and got % extent == 0:  # trailing dims flattened into the channel dim (NCHW flatten)
        merged = 1
        for d in range(ch.dim + 1, len(shape_in)):
            merged *= shape_in[d]
            if merged * extent == got:
                return _Ch(ch.space, o, ch.mult * merged, ch.src)
    if got < extent and extent % got == 0 and ch.mult % (extent // got) == 0:  # an earlier flatten undone
        return _Ch(ch.space, o, ch.mult // (extent // got), ch.src)
    _unknown(node, where, "it splits the channel dim")


# --------------------------------------------------------------------------------------------------- helpers
def _packet(node) -> str:
    target = node.target
    name = getattr(target, "__name__", str(target))
    return name.split(".")[0]


def _op(node) -> str:
    return str(node.target)


def _arg(node, index: int, name: str, default):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _shape(node) -> tuple[int, ...]:
    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    if isinstance(value, (tuple, list)):
        value = value[0]
    return tuple(int(s) for s in value.shape) if isinstance(value, torch.Tensor) else ()


def _unknown(node, where: str, why: str | None = None):
    raise ValueError(f"Channel tracing does not understand {_op(node)} at module {where!r}"
                     f"{f': {why}' if why else ''}; it touches a channel space, so no coupled-channel groups can be "
                     "derived for this model (pass explicit ChannelGroup objects instead).")


def default_inputs(model: nn.Module) -> dict | torch.Tensor:
    """One example input for tracing: `{main_input_name: image}` for HF vision configs (`num_channels`,
    `image_size`), else a tensor sized by the first conv/linear."""
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    device = param.device if param is not None else "cpu"
    config = getattr(model, "config", None)
    channels = getattr(config, "num_channels", None)
    if isinstance(channels, int):
        size = getattr(config, "image_size", 224)
        size = size if isinstance(size, int) else 224
        name = getattr(model, "main_input_name", "pixel_values")
        return {name: torch.zeros(1, channels, size, size, dtype=dtype, device=device)}
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            spatial = (64,) * (module.weight.dim() - 2)
            return torch.zeros(1, module.in_channels, *spatial, dtype=dtype, device=device)
        if isinstance(module, nn.Linear):
            return torch.zeros(1, module.in_features, dtype=dtype, device=device)
    raise ValueError(f"Cannot guess an example input for {type(model).__name__}; pass example_inputs.")


def _export(model: nn.Module, example_inputs):
    if example_inputs is None:
        example_inputs = default_inputs(model)
    if isinstance(example_inputs, Mapping):
        args, kwargs = (), {k: v for k, v in example_inputs.items() if k not in ("labels", "label")}
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    else:
        args, kwargs = (example_inputs,), {}
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return torch.export.export(model, args, kwargs, strict=False)
    except Exception as error:  # noqa: BLE001  (any export failure: report it with the op it names)
        text = str(error).strip().splitlines()
        head = " ".join(line.strip() for line in text[:6])[:600]
        raise ValueError(f"Cannot trace {type(model).__name__} with torch.export to find its channel groups "
                         f"({type(error).__name__}: {head}). Pass explicit ChannelGroup objects instead.") from error
    finally:
        model.train(training)
