"""Walk a sequential PyTorch model into the C runtime's layer list (``tp_layer_spec``).

The runtime runs a chain of layers on one sample of shape (C, H, W): dense, conv2d (a Conv1d is
a conv2d of height 1), the activations ReLU, ReLU6, LeakyReLU, Sigmoid, Tanh, ELU, CELU, SELU,
Hardtanh (in place) and SiLU, GELU, Hardswish, Hardsigmoid, Mish (an output of their own), max /
average pooling and flatten. This module turns an
``nn.Sequential`` (nested ones are flattened) into that chain with every shape worked out, and
names any module it cannot run by its type and its path in the model.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils import parametrize

from tinyprop.export.geometry import check_geometry
from tinyprop.export.naming import module_name
from tinyprop.export.tracing import TracingError, traced_layers

# tp_layer_kind values of runtime/include/tinyprop.h
DENSE, CONV2D, RELU, MAXPOOL, AVGPOOL, FLATTEN, RELU6, LEAKY_RELU, SIGMOID, TANH = range(10)
SILU, GELU, GELU_TANH, HARDSWISH, HARDSIGMOID, MISH = range(10, 16)
ELU, CELU, SELU, HARDTANH = range(16, 20)
KIND_NAMES = {
    DENSE: "TP_LAYER_DENSE",
    CONV2D: "TP_LAYER_CONV2D",
    RELU: "TP_LAYER_RELU",
    MAXPOOL: "TP_LAYER_MAXPOOL",
    AVGPOOL: "TP_LAYER_AVGPOOL",
    FLATTEN: "TP_LAYER_FLATTEN",
    RELU6: "TP_LAYER_RELU6",
    LEAKY_RELU: "TP_LAYER_LEAKY_RELU",
    SIGMOID: "TP_LAYER_SIGMOID",
    TANH: "TP_LAYER_TANH",
    SILU: "TP_LAYER_SILU",
    GELU: "TP_LAYER_GELU",
    GELU_TANH: "TP_LAYER_GELU_TANH",
    HARDSWISH: "TP_LAYER_HARDSWISH",
    HARDSIGMOID: "TP_LAYER_HARDSIGMOID",
    MISH: "TP_LAYER_MISH",
    ELU: "TP_LAYER_ELU",
    CELU: "TP_LAYER_CELU",
    SELU: "TP_LAYER_SELU",
    HARDTANH: "TP_LAYER_HARDTANH",
}
# elementwise, in place, the derivative taken from the output
ACTIVATIONS = (RELU, RELU6, LEAKY_RELU, SIGMOID, TANH, ELU, CELU, SELU, HARDTANH)
# elementwise with an output of their own, the derivative taken from the input (kept until
# their backward): tp_activation_reads_input
INPUT_ACTIVATIONS = (SILU, GELU, GELU_TANH, HARDSWISH, HARDSIGMOID, MISH)
_ACTIVATION_KINDS = {nn.ReLU: RELU, nn.ReLU6: RELU6, nn.LeakyReLU: LEAKY_RELU,
                     nn.Sigmoid: SIGMOID, nn.Tanh: TANH, nn.SiLU: SILU, nn.GELU: GELU,
                     nn.Hardswish: HARDSWISH, nn.Hardsigmoid: HARDSIGMOID,
                     nn.Mish: MISH, nn.ELU: ELU, nn.CELU: CELU, nn.SELU: SELU,
                     nn.Hardtanh: HARDTANH}  # fmt: skip
SUPPORTED = (
    "Linear, Conv1d, Conv2d (incl. depthwise, zero padding), ReLU, ReLU6, LeakyReLU "
    "(negative_slope >= 0), Sigmoid, Tanh, ELU (alpha >= 0), CELU, SELU, Hardtanh, SiLU, GELU, "
    "Hardswish, Hardsigmoid, Mish, "
    "MaxPool1d/2d, AvgPool1d/2d, "
    "AdaptiveAvgPool1d/2d and AdaptiveMaxPool1d/2d to a size that divides the input, Flatten, "
    "Identity, Dropout with p=0; BatchNorm folded first (tinyprop.export.fold_batch_norm)"
)


class UnsupportedLayerError(ValueError):
    """A module the C runtime cannot run; the message names its type and path."""


@dataclass
class LayerSpec:
    """One runtime layer: the fields of ``tp_layer_spec`` plus shapes and the module path."""

    kind: int
    path: str  # where it sits in the PyTorch model, e.g. "3" or "features.0"
    module_type: str
    input_shape: tuple[int, int, int]  # (C, H, W) of one sample
    output_shape: tuple[int, int, int]
    out_channels: int = 0
    kernel: tuple[int, int] = (0, 0)
    stride: tuple[int, int] = (0, 0)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    has_bias: bool = False
    weight: np.ndarray | None = field(default=None, repr=False)  # float32, PyTorch layout
    bias: np.ndarray | None = field(default=None, repr=False)

    @property
    def trainable(self) -> bool:
        """True for dense and conv layers (the ones with parameters)."""
        return self.kind in (DENSE, CONV2D)

    @property
    def fan_in(self) -> int:
        """Inputs per output: in_features, or C_in / groups · kh · kw."""
        if self.kind == DENSE:
            return self.input_shape[0]
        if self.kind == CONV2D:
            return self.input_shape[0] // self.groups * self.kernel[0] * self.kernel[1]
        return 0

    @property
    def output_size(self) -> int:
        """N_l: output elements per sample."""
        return math.prod(self.output_shape)

    @property
    def input_size(self) -> int:
        """Input elements per sample."""
        return math.prod(self.input_shape)


def _pair(value) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    return (int(value[0]), int(value[-1]))


def _single(value) -> int:
    return int(value) if isinstance(value, int) else int(value[0])


ADAPTIVE_POOLS = (
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
)
DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.FeatureAlphaDropout)

# the classes the runtime runs, by the methods that say what they compute: a subclass that
# overrides one of them (a residual Sequential, a scaled Linear) computes something else
_RUNTIME_METHODS = {
    nn.Sequential: ("forward",),
    nn.Linear: ("forward",),
    nn.Conv1d: ("forward", "_conv_forward"),
    nn.Conv2d: ("forward", "_conv_forward"),
    nn.ReLU: ("forward",),
    nn.ReLU6: ("forward",),
    nn.LeakyReLU: ("forward",),
    nn.Sigmoid: ("forward",),
    nn.Tanh: ("forward",),
    nn.SiLU: ("forward",),
    nn.GELU: ("forward",),
    nn.Hardswish: ("forward",),
    nn.Hardsigmoid: ("forward",),
    nn.Mish: ("forward",),
    nn.ELU: ("forward",),
    nn.CELU: ("forward",),
    nn.SELU: ("forward",),
    nn.Hardtanh: ("forward",),
    nn.MaxPool1d: ("forward",),
    nn.MaxPool2d: ("forward",),
    nn.AvgPool1d: ("forward",),
    nn.AvgPool2d: ("forward",),
    nn.AdaptiveAvgPool1d: ("forward",),
    nn.AdaptiveAvgPool2d: ("forward",),
    nn.AdaptiveMaxPool1d: ("forward",),
    nn.AdaptiveMaxPool2d: ("forward",),
    nn.Flatten: ("forward",),
    nn.Identity: ("forward",),
    **{dropout: ("forward",) for dropout in DROPOUTS},
}


def _check_computes_its_base(path: str, module: nn.Module) -> None:
    """Refuse a module whose output is not its supported class's: a subclass with its own
    forward, or forward hooks (both were exported as the plain layer, silently)."""
    if parametrize.is_parametrized(module):
        names = ", ".join(module.parametrizations.keys())
        raise _unsupported(
            path, module, f"its {names} is computed by a parametrization (weight_norm, "
            "spectral_norm, ...) that the C runtime would not apply: it would train the "
            "computed values as plain weights, not what PyTorch trains; remove it first with "
            f"torch.nn.utils.parametrize.remove_parametrizations(module, {names.split(', ')[0]!r})"
            " (keeps the current values)"
        )  # fmt: skip
    if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        raise _unsupported(
            path, module, "its weights are not drawn yet (a lazy layer before its first "
            "forward); run one forward pass of the model (e.g. model(example_batch)) first"
        )  # fmt: skip
    replaced = [
        name for name in vars(module) if inspect.isroutine(getattr(type(module), name, None))
    ]
    if replaced:
        raise _unsupported(
            path, module, f"its {replaced[0]} is replaced on the module itself (module."
            f"{replaced[0]} = ...), so it may compute something else than its class (the C "
            f"runtime and torch.fx run the class's {replaced[0]}); delete the attribute (del "
            f"module.{replaced[0]}) or write the change as layers"
        )  # fmt: skip
    hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
    if any(getattr(hook, "__module__", None) != "tinyprop.model" for hook in hooks):
        raise _unsupported(
            path, module, "it has forward hooks, which may change what it computes (the C "
            "runtime would not run them); remove them, or fold what they do into the weights"
        )  # fmt: skip
    kind = getattr(module, "_tinyprop_original_class", type(module))  # before tinyprop.apply
    for base, methods in _RUNTIME_METHODS.items():
        if issubclass(kind, base):
            changed = [m for m in methods if getattr(kind, m) is not getattr(base, m)]
            if changed:
                raise _unsupported(
                    path, module, f"a subclass of {base.__name__} with its own {changed[0]}, "
                    f"so it may compute something else than {base.__name__}"
                )  # fmt: skip
            return


def _sequence(
    model: nn.Module, prefix: str = "", holders: tuple[int, ...] = ()
) -> list[tuple[str, nn.Module]]:
    """The leaf modules of (nested) nn.Sequential containers, in order, with their paths (a
    module held twice comes twice: ``named_children`` would leave the second out); ``holders``:
    the ids of the containers above (a file can make one hold itself)."""
    _check_computes_its_base(prefix or "<root>", model)
    if isinstance(model, nn.Sequential):
        if id(model) in holders:
            raise UnsupportedLayerError(
                f"cannot export layer '{prefix}': an nn.Sequential that holds itself (its "
                "forward would never end); save the model again from PyTorch"
            )
        leaves = []
        for name, child in model._modules.items():
            if not isinstance(child, nn.Module):  # (PyTorch's forward would call it)
                raise UnsupportedLayerError(
                    f"cannot export layer '{prefix + '.' if prefix else ''}{name}': the "
                    f"nn.Sequential holds {type(child).__name__} there, not a layer (its forward "
                    "would fail); remove the entry (del model[i]) or put nn.Identity() there"
                )
            leaves += _sequence(
                child, f"{prefix}.{name}" if prefix else name, (*holders, id(model))
            )
        return leaves
    return [(prefix or "<root>", model)]


_ACTIVATIONS = (
    nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.Softshrink, nn.Hardshrink, nn.LogSigmoid,
    nn.RReLU, nn.Threshold, nn.GLU,
)  # fmt: skip
# (the activations above are the ones the runtime lacks; PReLU has its own way out)
_RUNTIME_ACTIVATIONS = (
    "ReLU, ReLU6, LeakyReLU (negative_slope >= 0), Sigmoid, Tanh, ELU (alpha >= 0), CELU, "
    "SELU, Hardtanh, SiLU, GELU, Hardswish, Hardsigmoid and Mish"
)


def _what_to_do(module: nn.Module) -> str:
    """The way out for a module type the runtime does not run."""
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return (
            "the runtime trains one sample at a time, without batch statistics; fold it into "
            "the layer before it with tinyprop.export.fold_batch_norm(model) (tinyprop export "
            "--fold-batch-norm), which keeps what the model computes in eval mode"
        )
    if isinstance(module, nn.PReLU):
        return (
            "its weight (the slope of the negative side) trains, and the runtime trains only "
            "Linear and Conv weights. With the slope fixed it is a LeakyReLU: for "
            "num_parameters=1 and a slope >= 0, put nn.LeakyReLU(negative_slope=float("
            "prelu.weight)) in its place (the same function; the slope then no longer trains)"
        )
    if isinstance(module, _ACTIVATIONS):
        return (
            f"the runtime's activations are {_RUNTIME_ACTIVATIONS}; put one of them, e.g. "
            "nn.ReLU(), in its place and fine-tune the model in PyTorch before exporting"
        )
    if isinstance(module, (nn.Softmax, nn.LogSoftmax)):
        return (
            "the runtime's loss is softmax cross-entropy on the logits; end the model with the "
            "last Linear (train it in PyTorch with nn.CrossEntropyLoss on the logits)"
        )
    if type(module).forward is not nn.Module.forward and any(True for _ in module.children()):
        return (
            "the exporter reads the layers of an nn.Sequential in order and cannot read a "
            "forward written in Python (functional calls, branches, residual sums); write the "
            "model as an nn.Sequential of supported layers (nested ones are fine)"
        )
    if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
        return "it has no forward of its own; put its layers in an nn.Sequential instead"
    return "leave it out, or replace it by layers the runtime runs"


def written_in_python(model: nn.Module) -> bool:
    """True for a module with layers whose own forward calls them (read by torch.fx), False
    for an nn.Sequential or a single layer."""
    kind = getattr(model, "_tinyprop_original_class", type(model))
    return (
        not issubclass(kind, tuple(_RUNTIME_METHODS))
        and kind.forward is not nn.Module.forward
        and any(True for _ in model.children())
    )


def _layers_of(model: nn.Module, input_shape: tuple[int, ...]) -> list[tuple[str, nn.Module]]:
    """The layers ``model`` runs with their paths: an nn.Sequential's leaves, or the chain a
    forward written in Python calls (read by torch.fx, :mod:`tinyprop.export.tracing`)."""
    if not written_in_python(model):
        return _sequence(model)
    _check_computes_its_base("<root>", model)  # lazy layers, forward hooks
    try:
        layers = traced_layers(model, input_shape)
    except TracingError as error:
        raise _unsupported("<root>", model, str(error)) from None
    for path, module in layers:
        _check_computes_its_base(path, module)
    return layers


def _unsupported(path: str, module: nn.Module, why: str) -> UnsupportedLayerError:
    return UnsupportedLayerError(
        f"cannot export layer '{path}' ({module_name(module)}): {why}. "
        f"The C runtime supports: {SUPPORTED}."
    )


EXACT_OVERLAP_ELEMENTS = 1 << 22  # larger views whose ranges meet count as sharing memory


def _element_offsets(tensor: torch.Tensor) -> np.ndarray:
    """The storage offsets (in elements) of every element of ``tensor``, flattened."""
    offsets = np.full((1,) * tensor.dim(), tensor.storage_offset(), dtype=np.int64)
    for dim, (size, stride) in enumerate(zip(tensor.shape, tensor.stride(), strict=True)):
        shape = [1] * tensor.dim()
        shape[dim] = size
        offsets = offsets + (np.arange(size, dtype=np.int64) * stride).reshape(shape)
    return offsets.reshape(-1)


def _overlaps_itself(tensor: torch.Tensor) -> bool:
    """True when two elements of ``tensor`` are one place in memory (a stride of 0, an
    ``as_strided`` view whose rows overlap): PyTorch cannot update such a parameter in place."""
    if (
        tensor.untyped_storage().nbytes() < tensor.numel() * tensor.element_size()
        or tensor.numel() > RUNTIME_MAX_ELEMENTS
    ):
        return False  # refused for its storage or its size (_as_float32), before any copy
    reach = 0
    dims = zip(tensor.stride(), tensor.shape, strict=True)
    for stride, size in sorted((stride, size) for stride, size in dims if size > 1):
        if stride <= reach:  # may overlap: count the distinct places
            return stride == 0 or len(np.unique(_element_offsets(tensor))) < tensor.numel()
        reach += stride * (size - 1)
    return False


def _extent(tensor: torch.Tensor) -> tuple[int, int, int]:
    """(storage address, first byte, byte after the last) of ``tensor`` in its storage."""
    size = tensor.element_size()
    first = tensor.storage_offset() + sum(
        (n - 1) * st for n, st in zip(tensor.shape, tensor.stride(), strict=True) if st < 0
    )
    last = tensor.storage_offset() + sum(
        (n - 1) * st for n, st in zip(tensor.shape, tensor.stride(), strict=True) if st > 0
    )
    return tensor.untyped_storage().data_ptr(), first * size, (last + 1) * size


def _check_not_shared(path: str, module: nn.Module, owners: dict[int, str], seen: dict) -> None:
    """Refuse a layer whose weight or bias is another layer's (a module held twice, tied
    weights), or shares memory with another parameter (views of one tensor, a file that makes
    them so) or with itself: the runtime gives every layer and every value its own copy, which
    training would drift apart from what PyTorch trains."""
    for name, tensor in module.named_parameters(recurse=False):
        if tensor.numel() == 0:
            continue
        key = id(tensor) if tensor.is_meta else tensor.data_ptr()  # the same values
        if key in owners and owners[key] != path:
            raise UnsupportedLayerError(
                f"layers '{owners[key]}' and '{path}' share one {name} (one module used twice, "
                "or tied weights); the C runtime gives every layer its own copy and would train "
                "them apart. Export untied copies if that is what you want (e.g. "
                f"model[i].{name} = nn.Parameter(model[i].{name}.detach().clone()))"
            )
        owners.setdefault(key, path)
        if tensor.is_meta:
            continue
        fix = (
            "the C runtime gives every value its own place and would train them apart; export "
            f"a copy of its own (e.g. model[i].{name} = nn.Parameter(model[i].{name}.detach()"
            ".clone()))"
        )
        if _overlaps_itself(tensor):
            raise UnsupportedLayerError(
                f"layer '{path}' has a {name} of shape {tuple(tensor.shape)} whose values "
                f"overlap in memory (strides {tuple(tensor.stride())}): PyTorch cannot train it; "
                + fix
            )
        storage, low, high = _extent(tensor)
        for other_path, other_name, other, other_low, other_high in seen.get(storage, []):
            if (
                low < other_high
                and other_low < high
                and (
                    max(tensor.numel(), other.numel()) > EXACT_OVERLAP_ELEMENTS
                    or len(np.intersect1d(_element_offsets(tensor), _element_offsets(other)))
                )
            ):
                raise UnsupportedLayerError(
                    f"layer '{path}'s {name} and layer '{other_path}'s {other_name} share memory "
                    "(views of one tensor): training one changes the other in PyTorch; " + fix
                )
        seen.setdefault(storage, []).append((path, name, tensor, low, high))


def _window(size: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


INT32_MAX = 2**31 - 1  # the C runtime's sizes and offsets are int32
RUNTIME_MAX_ELEMENTS = 2**26  # TP_MAX_ELEMENTS: one tensor, one buffer (tinyprop.export.limits)


def _as_float32(tensor: torch.Tensor, path: str, name: str) -> np.ndarray:
    # checked before the values are copied: a file of a few bytes can claim any shape
    if tensor.is_meta:
        raise ValueError(f"layer '{path}' has a {name} without values (a meta tensor)")
    if not tensor.is_floating_point():
        raise ValueError(
            f"layer '{path}' has a {name} of dtype {tensor.dtype}; the C runtime trains float32 "
            "weights: export the float model (not a quantized or complex one)"
        )
    if tensor.untyped_storage().nbytes() < tensor.numel() * tensor.element_size():
        raise ValueError(
            f"layer '{path}' has a {name} of shape {tuple(tensor.shape)} stored in "
            f"{tensor.untyped_storage().nbytes()} bytes (an expanded tensor, not trained "
            "weights); cannot export it"
        )
    if tensor.numel() > RUNTIME_MAX_ELEMENTS:  # (checked before a copy of up to 2 GiB)
        raise ValueError(
            f"layer '{path}' has a {name} of {tensor.numel():,} values, beyond the C runtime's "
            f"{RUNTIME_MAX_ELEMENTS:,} per tensor (2^26, 256 MiB of float32)"
        )
    original = tensor.detach().to("cpu")
    if not bool(torch.isfinite(original).all()):
        raise ValueError(f"layer '{path}' has a NaN or infinite {name}; cannot export it")
    array = original.to(torch.float32).contiguous().numpy().reshape(-1).copy()
    if not np.all(np.isfinite(array)):  # finite in float64, beyond float32's 3.4e38
        largest = float(original.abs().max())
        raise ValueError(
            f"layer '{path}' has a {name} value of magnitude {largest:.3g}, beyond float32's "
            "range (3.4e38), in which the C runtime computes; cannot export it"
        )
    return array


def _same_padding(path: str, module: nn.Module, kernel, dilation) -> tuple[int, int]:
    """padding='same' as numbers: PyTorch pads dilation · (kernel − 1) in all, the odd one
    at the end; the runtime pads both sides alike, so an odd total cannot be run."""
    totals = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
    if any(total % 2 for total in totals):
        raise _unsupported(
            path, module, f"padding='same' with kernel {module.kernel_size} and dilation "
            f"{module.dilation} pads one more zero at the end than at the start, and the "
            "runtime pads both sides alike; use an odd kernel size (or dilation · (kernel − 1) "
            "even), or give the padding as numbers"
        )  # fmt: skip
    return (totals[0] // 2, totals[1] // 2)


def _conv(path: str, module: nn.Module, shape: tuple[int, int, int], two_d: bool) -> LayerSpec:
    channels, height, width = shape
    if module.padding_mode != "zeros":
        raise _unsupported(path, module, f"padding_mode={module.padding_mode!r} (only 'zeros')")
    if getattr(module, "transposed", False):
        raise _unsupported(path, module, "transposed convolution")
    if channels != module.in_channels:
        raise ValueError(
            f"layer '{path}' ({module_name(module)}) expects {module.in_channels} input "
            f"channels but the previous layer gives {channels}"
        )
    kernel = _pair(module.kernel_size) if two_d else (1, _single(module.kernel_size))
    stride = _pair(module.stride) if two_d else (1, _single(module.stride))
    dilation = _pair(module.dilation) if two_d else (1, _single(module.dilation))
    if module.padding == "same":
        padding = _same_padding(path, module, kernel, dilation)
    elif module.padding == "valid":
        padding = (0, 0)
    else:
        padding = _pair(module.padding) if two_d else (0, _single(module.padding))
    out_h = _window(height, kernel[0], stride[0], padding[0], dilation[0])
    out_w = _window(width, kernel[1], stride[1], padding[1], dilation[1])
    if out_h < 1 or out_w < 1:
        raise ValueError(f"layer '{path}' ({module_name(module)}) leaves no output for {shape}")
    return LayerSpec(
        kind=CONV2D,
        path=path,
        module_type=module_name(module),
        input_shape=shape,
        output_shape=(module.out_channels, out_h, out_w),
        out_channels=module.out_channels,
        kernel=kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=module.groups,
        has_bias=module.bias is not None,
        weight=_as_float32(module.weight, path, "weight"),
        bias=None if module.bias is None else _as_float32(module.bias, path, "bias"),
    )


def _pool(path: str, module: nn.Module, shape: tuple[int, int, int], two_d: bool) -> LayerSpec:
    channels, height, width = shape
    kind = MAXPOOL if isinstance(module, (nn.MaxPool1d, nn.MaxPool2d)) else AVGPOOL
    if kind == MAXPOOL:
        if module.return_indices:
            raise _unsupported(path, module, "return_indices=True")
        if _pair(module.dilation) != (1, 1) if two_d else _single(module.dilation) != 1:
            raise _unsupported(path, module, "dilation other than 1")
    elif getattr(module, "divisor_override", None) is not None:
        raise _unsupported(path, module, "divisor_override")
    stride_value = module.stride if module.stride is not None else module.kernel_size
    if two_d:
        kernel, stride, padding = (
            _pair(module.kernel_size),
            _pair(stride_value),
            _pair(module.padding),
        )
    else:
        kernel = (1, _single(module.kernel_size))
        stride = (1, _single(stride_value))
        padding = (0, _single(module.padding))
    if kind == AVGPOOL and not module.count_include_pad and padding != (0, 0):
        raise _unsupported(
            path, module, "count_include_pad=False with padding (the runtime divides by the "
            "whole window); use count_include_pad=True or padding=0"
        )  # fmt: skip
    if any(2 * p > k for p, k in zip(padding, kernel, strict=True)):
        raise ValueError(
            f"layer '{path}' ({module_name(module)}): padding {module.padding} is more than "
            f"half the kernel {module.kernel_size}, which PyTorch refuses to run as well"
        )
    out_h = _window(height, kernel[0], stride[0], padding[0])
    out_w = _window(width, kernel[1], stride[1], padding[1])
    if out_h < 1 or out_w < 1:
        raise ValueError(f"layer '{path}' ({module_name(module)}) leaves no output for {shape}")
    if module.ceil_mode and (out_h, out_w) != tuple(
        _ceil_window(size, k, st, p)
        for size, k, st, p in zip((height, width), kernel, stride, padding, strict=True)
    ):
        raise _unsupported(
            path, module, f"ceil_mode=True, which gives a partial window more than "
            f"ceil_mode=False on a {shape} input; use ceil_mode=False, or an input size whose "
            "windows come out even"
        )  # fmt: skip
    return LayerSpec(
        kind=kind,
        path=path,
        module_type=module_name(module),
        input_shape=shape,
        output_shape=(channels, out_h, out_w),
        kernel=kernel,
        stride=stride,
        padding=padding,
    )


def _ceil_window(size: int, kernel: int, stride: int, padding: int) -> int:
    """Pooling output size with ceil_mode=True, as PyTorch computes it (a last window that
    would start in the padding at the end is left out)."""
    out = -(-(size + 2 * padding - kernel) // stride) + 1
    return out - 1 if (out - 1) * stride >= size + padding else out


def _adaptive(path: str, module: nn.Module, shape: tuple[int, int, int], two_d: bool):
    """An adaptive pool whose windows come out even (each input size a multiple of its output
    size) is the plain pool with kernel = stride = input / output; others are refused."""
    channels, height, width = shape
    kind = AVGPOOL if isinstance(module, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)) else MAXPOOL
    if kind == MAXPOOL and module.return_indices:
        raise _unsupported(path, module, "return_indices=True")
    size = module.output_size
    if not isinstance(size, (tuple, list)):
        size_per_dimension = (size, size) if two_d else (size,)
    else:
        size_per_dimension = tuple(size)
    wanted = ((1,) if not two_d else ()) + size_per_dimension  # (height, width)
    inputs = (height, width)
    sizes = tuple(i if w is None else int(w) for i, w in zip(inputs, wanted, strict=True))
    if any(i % o for i, o in zip(inputs, sizes, strict=True)):
        raise _unsupported(
            path, module, f"output_size={size} on a {inputs[1] if not two_d else inputs} "
            "input: its windows overlap unevenly; use an input size that is a multiple of the "
            "output size, or a plain pooling layer"
        )  # fmt: skip
    kernel = (height // sizes[0], width // sizes[1])
    return LayerSpec(
        kind=kind,
        path=path,
        module_type=module_name(module),
        input_shape=shape,
        output_shape=(channels, *sizes),
        kernel=kernel,
        stride=kernel,
    )


def describe(model: nn.Module, input_shape: tuple[int, ...]) -> list[LayerSpec]:
    """The runtime layers of ``model`` for one sample of ``input_shape``.

    Args:
        model: an ``nn.Sequential`` (possibly nested) of supported layers.
        input_shape: one sample's shape without the batch: ``(F,)``, ``(C, L)`` or ``(C, H, W)``.

    Returns:
        One :class:`LayerSpec` per runtime layer (Identity and Dropout are left out).

    Raises:
        UnsupportedLayerError: naming the type and path of a module the runtime cannot run.
        ValueError: when shapes do not fit together.

    Example:
        >>> describe(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), (1, 2, 2))[1].fan_in
        4
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise UnsupportedLayerError(
            f"the model is a TorchScript module ({type(model).__name__}), whose layers the "
            "exporter cannot read; export the nn.Module it was scripted or traced from"
        )
    model = compiled_original(model)
    if (
        not 1 <= len(input_shape) <= 3
        or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) for s in input_shape)
        or any(s < 1 for s in input_shape)
    ):
        raise ValueError(
            f"input_shape must be one sample's shape (F,), (C, L) or (C, H, W), got {input_shape}"
        )
    padded = (1,) * (3 - len(input_shape)) + tuple(int(s) for s in input_shape)
    # (F,) -> (F, 1, 1); (C, L) -> (C, 1, L); (C, H, W) as is
    shape = (
        (padded[2], 1, 1)
        if len(input_shape) == 1
        else ((padded[1], 1, padded[2]) if len(input_shape) == 2 else padded)
    )
    rank = len(input_shape)  # the PyTorch tensor rank of one sample, to check layer inputs
    layers: list[LayerSpec] = []
    owners: dict[int, str] = {}  # address of every weight and bias -> its first layer's path
    seen: dict = {}  # storage address -> (path, name, tensor, first byte, byte after) so far
    for path, module in _layers_of(model, tuple(int(size) for size in input_shape)):
        _check_not_shared(path, module, owners, seen)
        name = module_name(module)
        if isinstance(module, DROPOUTS) and not module.p == 0:  # (NaN and p < 0 too)
            raise _unsupported(
                path, module, f"p={module.p}: the runtime has no dropout; set its p to 0 or put "
                "nn.Identity() in its place to export (training then runs without dropout)"
            )  # fmt: skip
        if isinstance(module, (nn.Identity, *DROPOUTS)):
            continue
        check_geometry(path, module)  # its settings against its weights (a file may lie)
        if isinstance(module, nn.Linear):
            if rank != 1:
                raise _unsupported(
                    path, module, f"a Linear on a {rank}-D sample (put a Flatten before it)"
                )
            if shape[0] != module.in_features:
                raise ValueError(
                    f"layer '{path}' (Linear) expects {module.in_features} inputs but the "
                    f"previous layer gives {shape[0]}"
                )
            spec = LayerSpec(
                kind=DENSE,
                path=path,
                module_type=name,
                input_shape=shape,
                output_shape=(module.out_features, 1, 1),
                out_channels=module.out_features,
                has_bias=module.bias is not None,
                weight=_as_float32(module.weight, path, "weight"),
                bias=None if module.bias is None else _as_float32(module.bias, path, "bias"),
            )
        elif isinstance(module, (nn.Conv1d, nn.Conv2d)):
            two_d = isinstance(module, nn.Conv2d)
            if rank != (3 if two_d else 2):
                raise _unsupported(path, module, f"a {name} on a {rank}-D sample")
            spec = _conv(path, module, shape, two_d)
        elif type(module) in _ACTIVATION_KINDS or isinstance(module, nn.ReLU):
            spec = _activation(path, module, shape, layers)
        elif isinstance(module, (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d)):
            two_d = isinstance(module, (nn.MaxPool2d, nn.AvgPool2d))
            if rank != (3 if two_d else 2):
                raise _unsupported(path, module, f"a {name} on a {rank}-D sample")
            spec = _pool(path, module, shape, two_d)
        elif isinstance(module, ADAPTIVE_POOLS):
            two_d = isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d))
            if rank != (3 if two_d else 2):
                raise _unsupported(path, module, f"a {name} on a {rank}-D sample")
            spec = _adaptive(path, module, shape, two_d)
        elif isinstance(module, nn.Flatten):
            if module.start_dim != 1 or module.end_dim != -1:
                raise _unsupported(path, module, "start_dim/end_dim other than 1/-1")
            spec = LayerSpec(FLATTEN, path, name, shape, (math.prod(shape), 1, 1))
            rank = 1
        else:
            raise _unsupported(path, module, f"no C implementation; {_what_to_do(module)}")
        layers.append(spec)
        shape = spec.output_shape
    if not any(layer.trainable for layer in layers):
        raise ValueError("the model has no Linear or Conv layer; nothing to train")
    if math.prod(shape) < 2:
        raise ValueError(f"the model's output {shape} has fewer than two classes")
    if rank != 1:
        raise ValueError(
            f"the model's output per sample must be a vector of logits, got shape {shape}; "
            "end with Flatten and Linear"
        )
    from tinyprop.export.limits import check_layers  # (limits reads this module's kinds)

    check_layers(layers)
    return layers


def compiled_original(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile(model)``, ``nn.DataParallel(model)`` or
    ``DistributedDataParallel(model)`` wraps (the same layers and weights; wrappers in any
    nesting), or ``model``."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
            continue
        original = getattr(model, "_orig_mod", None)
        if not isinstance(original, nn.Module):
            return model
        model = original


def _activation_settings(path: str, module: nn.Module, kind: int) -> np.ndarray | None:
    """The settings the runtime reads through the spec's weight pointer, as float32 (ATen's
    ``Scalar.to<float>()``): LeakyReLU's negative_slope, ELU's alpha, CELU's alpha and
    1 / alpha (divided in double, as ``at::celu`` does), Hardtanh's min_val and max_val. Each
    must leave the output telling what the derivative needs (it is taken from the output)."""
    names = {LEAKY_RELU: ("negative_slope",), ELU: ("alpha",), CELU: ("alpha",),
             HARDTANH: ("min_val", "max_val")}.get(kind)  # fmt: skip
    if names is None:
        return None
    try:  # (a model loaded from a file may hold anything there)
        values = [float(getattr(module, setting)) for setting in names]
    except (TypeError, ValueError):
        shown = ", ".join(f"{setting}={getattr(module, setting)!r}" for setting in names)
        raise _unsupported(path, module, f"{shown} is not a number") from None
    name = ", ".join(names)
    if kind == CELU and values[0]:
        values.append(1.0 / values[0])
    settings = np.array(values, dtype=np.float32)
    shown = ", ".join(f"{v:g}" for v in values)
    if not np.all(np.isfinite(settings)):
        raise _unsupported(path, module, f"{name}={shown} is not finite in float32")
    if kind in (LEAKY_RELU, ELU) and values[0] < 0:
        raise _unsupported(
            path, module, f"{name}={shown}: the runtime takes the derivative from the output, "
            "which tells x > 0 by y > 0 only for a value >= 0; use one >= 0 (PyTorch's default "
            f"is {0.01 if kind == LEAKY_RELU else 1.0})"
        )  # fmt: skip
    if kind == CELU and not values[0]:
        raise _unsupported(path, module, "alpha=0 (PyTorch refuses it too)")
    if kind == HARDTANH and values[0] > values[1]:
        raise _unsupported(path, module, f"min_val > max_val ({shown})")
    return settings


def _activation(path: str, module: nn.Module, shape, layers: list[LayerSpec]) -> LayerSpec:
    """ReLU, ReLU6, LeakyReLU (its negative_slope as the spec's one weight), Sigmoid, Tanh,
    ELU, CELU, SELU, Hardtanh (their settings as the spec's weight), SiLU, GELU (either form),
    Hardswish, Hardsigmoid, Mish."""
    kind = RELU if isinstance(module, nn.ReLU) else _ACTIVATION_KINDS[type(module)]
    if kind == GELU and module.approximate not in ("none", "tanh"):
        raise _unsupported(path, module, f"approximate={module.approximate!r}")
    if kind == GELU and module.approximate == "tanh":
        kind = GELU_TANH
    weight = _activation_settings(path, module, kind)
    before = next((x for x in reversed(layers) if x.kind != FLATTEN), None)
    if (
        kind in ACTIVATIONS
        and before is not None
        and before.kind in ACTIVATIONS
        and not kind == before.kind == RELU
    ):
        raise _unsupported(
            path, module, f"it follows the activation '{before.path}' ({before.module_type}): "
            "the runtime applies ReLU, ReLU6, LeakyReLU, Sigmoid, Tanh, ELU, CELU, SELU and "
            "Hardtanh in place, so the second would overwrite the output the first one's "
            "backward needs; merge them into one activation"
        )  # fmt: skip
    return LayerSpec(kind, path, module_name(module), shape, shape, weight=weight)


def inference_bytes(layers: list[LayerSpec]) -> int:
    """RAM for inference with the weights in flash: two buffers of the largest activation."""
    largest = max([math.prod(layers[0].input_shape)] + [x.output_size for x in layers])
    return 2 * largest * 4


def arena_bytes(
    layers: list[LayerSpec], policy: str, optimizer: str, momentum: float, mode=None
) -> int:
    """Bytes of the training arena, exactly as ``tp_arena_bytes_mode`` computes them.

    Args:
        layers: from :func:`describe`.
        policy: ``full``, ``topk``, ``tinyprop`` or ``tinypropv2``.
        optimizer: ``sgd`` or ``adam``.
        momentum: SGD momentum (0 keeps no momentum buffer).
        mode: a :class:`tinyprop.memory.MemoryMode`; every layer trained when omitted.
    """
    from tinyprop.export.arena import plan_arena

    return plan_arena(layers, policy, optimizer, momentum, mode).bytes
