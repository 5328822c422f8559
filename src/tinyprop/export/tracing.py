"""Read a model whose ``forward`` is written in Python as the chain of layers it runs.

Many models are an ``nn.Module`` whose forward calls its layers and functions in turn (the
PyTorch MNIST example: ``F.max_pool2d(F.relu(self.conv1(x)), 2)``, ``x.view(x.size(0), -1)``).
``torch.fx`` records that forward as a graph; when the graph is a chain (every result used by
the next call only) of what the runtime runs, it is that chain of layers: each submodule by
its path in the model, each function as the layer it computes (``F.relu`` -> ``nn.ReLU``,
``F.max_pool2d(x, 2)`` -> ``nn.MaxPool2d(2)``, a view, flatten or squeeze to ``(B, -1)`` ->
``nn.Flatten``, ``x.mean((2, 3))`` -> a global average pool and ``nn.Flatten``; dropout
with p > 0 becomes ``nn.Dropout`` and is refused as such, whatever the mode). Anything
else (a residual sum, a branch, a function the runtime lacks, a forward that cannot be
traced) is refused with what it is and where.
"""

from __future__ import annotations

import copy
import math
import operator

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

# layers the tracer keeps whole (a tinyprop-applied layer is not in torch.nn's namespace)
_LEAVES = (nn.Linear, nn.Conv1d, nn.Conv2d)

_RELU = {F.relu, torch.relu, torch.relu_, F.relu_, "relu", "relu_"}
_ELEMENTWISE = {  # the other activations the runtime runs -> their layer
    F.relu6: nn.ReLU6, torch.sigmoid: nn.Sigmoid, F.sigmoid: nn.Sigmoid, "sigmoid": nn.Sigmoid,
    torch.tanh: nn.Tanh, F.tanh: nn.Tanh, "tanh": nn.Tanh, F.silu: nn.SiLU,
    F.hardswish: nn.Hardswish, F.hardsigmoid: nn.Hardsigmoid, F.mish: nn.Mish,
    F.selu: nn.SELU, torch.selu: nn.SELU,
}  # fmt: skip
_WITH_SETTINGS = {  # activations with settings -> (their layer, the settings' names)
    F.leaky_relu: (nn.LeakyReLU, ("negative_slope",)), F.elu: (nn.ELU, ("alpha",)),
    F.celu: (nn.CELU, ("alpha",)), torch.celu: (nn.CELU, ("alpha",)),
    F.hardtanh: (nn.Hardtanh, ("min_val", "max_val")),
}  # fmt: skip
_FLATTEN = {torch.flatten, "flatten", "view", "reshape", torch.reshape, "squeeze", torch.squeeze}
_SAME = {"contiguous", "clone"}  # the same values: no layer
_MEAN = {"mean", torch.mean}
_POOLS = {  # function -> (layer class, its arguments)
    F.max_pool1d: (nn.MaxPool1d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode",
                                  "return_indices")),
    F.max_pool2d: (nn.MaxPool2d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode",
                                  "return_indices")),
    F.avg_pool1d: (nn.AvgPool1d, ("kernel_size", "stride", "padding", "ceil_mode",
                                  "count_include_pad")),
    F.avg_pool2d: (nn.AvgPool2d, ("kernel_size", "stride", "padding", "ceil_mode",
                                  "count_include_pad", "divisor_override")),
    F.adaptive_avg_pool1d: (nn.AdaptiveAvgPool1d, ("output_size",)),
    F.adaptive_avg_pool2d: (nn.AdaptiveAvgPool2d, ("output_size",)),
    F.adaptive_max_pool1d: (nn.AdaptiveMaxPool1d, ("output_size", "return_indices")),
    F.adaptive_max_pool2d: (nn.AdaptiveMaxPool2d, ("output_size", "return_indices")),
    F.dropout: (nn.Dropout, ("p",)),
    F.softmax: (nn.Softmax, ("dim",)),
    F.log_softmax: (nn.LogSoftmax, ("dim",)),
}  # fmt: skip
_IN_PLACE = {"relu_", "clamp_", "mul_", "add_", "sigmoid_", "tanh_"}
_TWO_TENSORS = {operator.add, torch.add, operator.mul, torch.mul, torch.cat, "add", "mul"}


class TracingError(ValueError):
    """The forward is not a chain of layers the runtime runs; the message says why and where."""


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, _LEAVES) or super().is_leaf_module(module, qualified_name)


def _name(target) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def _is_tensor(node) -> bool:
    return isinstance(node, torch.fx.Node) and "tensor_meta" in node.meta


def _flattens(node: torch.fx.Node, source: torch.fx.Node) -> bool:
    """A view / reshape / flatten from (B, ...) to (B, prod(...)): what nn.Flatten does."""
    before, after = source.meta["tensor_meta"].shape, node.meta["tensor_meta"].shape
    return len(after) == 2 and after[0] == before[0] and after[1] == math.prod(before[1:])


def _global_mean(node: torch.fx.Node, source: torch.fx.Node, where: str) -> list[nn.Module]:
    """x.mean((2, 3)) (or over the length of a 1-D sample): a global average pool, flattened
    unless keepdim."""
    before, after = source.meta["tensor_meta"].shape, node.meta["tensor_meta"].shape
    rank = len(before)
    dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    keepdim = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
    if rank not in (3, 4) or sorted(d % rank for d in dims) != list(range(2, rank)):
        raise TracingError(
            f"{where} averages over dimensions {dims} of a {tuple(before)} batch; the runtime "
            "averages over the whole length or plane only (x.mean((2, 3)), x.mean(-1))"
        )
    pool = nn.AdaptiveAvgPool2d(1) if rank == 4 else nn.AdaptiveAvgPool1d(1)
    return [pool] if keepdim and len(after) == rank else [pool, nn.Flatten()]


def _layers_of(node: torch.fx.Node, graph_module, source) -> list[nn.Module]:
    """The layers a function or method call computes, or a TracingError naming it."""
    target = node.target
    where = f"'{node.name}' ({_name(target)} in forward)"
    if target in _RELU:
        return [nn.ReLU()]
    if target in _ELEMENTWISE:
        return [_ELEMENTWISE[target]()]
    if target is F.gelu:
        arguments = node.normalized_arguments(graph_module, normalize_to_only_use_kwargs=True)
        kwargs = arguments.kwargs if arguments is not None else node.kwargs
        return [nn.GELU(approximate=kwargs.get("approximate", "none"))]
    if target in _WITH_SETTINGS:
        layer_class, names = _WITH_SETTINGS[target]
        arguments = node.normalized_arguments(graph_module, normalize_to_only_use_kwargs=True)
        if arguments is None and len(node.args) > 1:  # (the defaults would be wrong)
            raise TracingError(f"{where}: its settings cannot be read; pass them by name")
        kwargs = arguments.kwargs if arguments is not None else node.kwargs
        settings = {name: kwargs[name] for name in names if name in kwargs}
        if layer_class is nn.Hardtanh and settings.get("min_val", -1.0) >= settings.get(
            "max_val", 1.0
        ):
            raise TracingError(f"{where} has min_val >= max_val ({settings})")
        return [layer_class(**settings)]
    if target in _SAME:
        return []
    if target in _MEAN:
        return _global_mean(node, source, where)
    if target in _FLATTEN:
        if _flattens(node, source):
            return [nn.Flatten()]
        raise TracingError(
            f"{where} gives shape {tuple(node.meta['tensor_meta'].shape[1:])} per sample, not a "
            "flat vector; the runtime reshapes only as nn.Flatten does (x.flatten(1), "
            "x.view(x.size(0), -1))"
        )
    if node.op == "call_function" and target in _POOLS:
        layer_class, names = _POOLS[target]
        arguments = node.normalized_arguments(graph_module, normalize_to_only_use_kwargs=True)
        kwargs = arguments.kwargs if arguments is not None else {}
        if target is F.dropout and kwargs.get("p", 0.5) == 0:
            return []  # (training=self.training is a constant of the traced mode: not read)
        return [layer_class(**{name: kwargs[name] for name in names if name in kwargs})]
    if target in _TWO_TENSORS and len([a for a in node.all_input_nodes if _is_tensor(a)]) > 1:
        raise TracingError(
            f"{where} combines two tensors (a residual sum or a branch); the runtime runs a "
            "chain of layers, each reading the one before"
        )
    if target in _TWO_TENSORS:
        raise TracingError(
            f"{where} scales or shifts by a constant, which the runtime has no layer for; "
            "fold the constant into the weights of the layer before it"
        )
    raise TracingError(
        f"{where} has no C implementation; write the forward with the runtime's layers "
        "(nn.Linear, nn.Conv1d/2d, nn.ReLU or F.relu, pooling, flatten)"
    )


def traced_layers(model: nn.Module, input_shape: tuple[int, ...]) -> list[tuple[str, nn.Module]]:
    """The layers ``model``'s forward runs, in order, with their paths (a function call's is
    the traced node's name, e.g. ``relu_1 (in forward)``).

    Args:
        model: an ``nn.Module`` whose forward calls its submodules and functions in a chain.
        input_shape: one sample's shape (no batch dimension).

    Raises:
        TracingError: the forward cannot be traced, is not a chain, or calls a function the
            runtime does not run; the message names it.
    """
    copied = copy.deepcopy(model)  # the shape pass runs it: BatchNorm statistics stay put
    try:
        graph_module = torch.fx.GraphModule(copied, _Tracer().trace(copied))
    except Exception as error:  # noqa: BLE001 - torch.fx raises many kinds
        raise TracingError(
            f"its forward cannot be traced by torch.fx ({type(error).__name__}: "
            f"{(str(error).splitlines() or [''])[0][:200]}); write the model as an nn.Sequential"
        ) from None
    parameter = next(model.parameters(), None)
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else None
    try:
        with torch.no_grad():
            ShapeProp(graph_module).propagate(torch.zeros(3, *input_shape, dtype=dtype))
    except Exception as error:  # noqa: BLE001 - whatever the forward raises
        cause = error.__cause__ or error
        raise TracingError(
            f"its forward fails on a batch of input shape {tuple(input_shape)} "
            f"({type(cause).__name__}: {str(cause).splitlines()[0][:200]})"
        ) from None
    nodes = list(graph_module.graph.nodes)
    inputs = [node for node in nodes if node.op == "placeholder"]
    if len(inputs) != 1:
        raise TracingError(f"its forward takes {len(inputs)} inputs; the runtime feeds one")
    layers, previous = [], inputs[0]
    for node in nodes:
        if node.op in ("placeholder", "get_attr") or not _is_tensor(node):
            if node.op == "get_attr":
                raise TracingError(
                    f"its forward reads the tensor '{node.target}' directly (F.linear, "
                    "F.conv2d on a weight); call the layer module instead"
                )
            continue  # x.size(0) and the like: read by the view they size
        sources = [a for a in node.all_input_nodes if _is_tensor(a)]
        if node.op == "output":
            if sources != [previous] or not isinstance(node.args[0], torch.fx.Node):
                raise TracingError("its forward does not return the last layer's output alone")
            break
        if sources != [previous] or len([u for u in previous.users if _is_tensor(u)]) > 1:
            if any(_name(u.target) in _IN_PLACE and not u.users for u in previous.users):
                raise TracingError(
                    f"'{previous.name}' is changed in place by a statement (x.relu_()) that "
                    "the graph does not chain; write x = x.relu() or x = F.relu(x)"
                )
            raise TracingError(
                f"'{node.name}' ({_name(node.target)} in forward) reads other tensors than the "
                "one before it, or one result is read twice (a residual sum or a branch); the "
                "runtime runs a chain of layers"
            )
        if node.op == "call_module":
            module = model.get_submodule(node.target)
            if any(path == node.target for path, _ in layers) and list(module.parameters()):
                raise TracingError(
                    f"its forward calls '{node.target}' more than once: one set of weights "
                    "used twice, which the runtime would train as two copies apart; give each "
                    "call its own layer"
                )
            layers.append((node.target, module))
        else:
            for layer in _layers_of(node, graph_module, previous):
                layers.append((f"{node.name} (in forward)", layer))
        previous = node
    return layers
