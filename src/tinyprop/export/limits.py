"""The C runtime's size limits, checked before anything is exported.

``tp_layer_shape`` (``runtime/src/model.c``) refuses with ``TP_ERR_SHAPE`` a layer whose
tensors do not fit its int32 arithmetic: every dimension at most 2^26 elements, every
product of a layer's shapes (its input, output, zero-padded input, weight) at most 2^26
elements (256 MiB of float32), kernels, strides, paddings and dilations at most 65,536; and
the arena plan (``runtime/src/plan.c``) refuses a buffer of more than 2^26 floats, buffers of
more than 2^30 floats in all and an arena of 2^29 floats (2 GiB) or more. Without these checks
an exported program was written (a header of up to 2 GiB of weights) whose ``tp_init``
stopped with status -3; now the exporter names the layer and the limit.

Example:
    >>> from torch import nn
    >>> from tinyprop.export.graph import describe
    >>> check_layers(describe(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), (1, 2, 2)))
"""

from __future__ import annotations

from tinyprop.export.graph import AVGPOOL, CONV2D, DENSE, MAXPOOL, RUNTIME_MAX_ELEMENTS, LayerSpec

MAX_ELEMENTS = RUNTIME_MAX_ELEMENTS  # TP_MAX_ELEMENTS: one shape product, one buffer (floats)
MAX_DIMENSION = 65536  # TP_MAX_DIMENSION: kernel, stride, padding, dilation
MAX_PLACED_FLOATS = 2**30  # every transient buffer together (offsets are uint32)
MAX_ARENA_FLOATS = 2**29 - 1  # TP_ARENA_MAX_FLOATS: the arena's bytes fit an int32
MAX_LAYERS = 16383  # the plan's steps (0 .. 2L) are int16


class RuntimeLimitError(ValueError):
    """A model beyond the C runtime's sizes; the message names the layer and the limit."""


def _fits(*factors: int) -> bool:
    """``product_fits`` of model.c: every factor and every running product in [1, 2^26]."""
    product = 1
    for factor in factors:
        product *= factor
        if not 1 <= factor <= MAX_ELEMENTS or product > MAX_ELEMENTS:
            return False
    return True


def _refuse(layer: LayerSpec, what: str) -> RuntimeLimitError:
    return RuntimeLimitError(
        f"layer '{layer.path}' ({layer.module_type}): {what}; the C runtime's shapes hold at "
        f"most {MAX_ELEMENTS:,} elements (2^26, 256 MiB of float32) per tensor and sizes of "
        f"kernels, strides and paddings up to {MAX_DIMENSION:,}. Use a smaller input or "
        "layer, or pool / stride earlier"
    )


def check_layers(layers: list[LayerSpec]) -> None:
    """Refuse what ``tp_layer_shape`` refuses with ``TP_ERR_SHAPE`` (see the module doc).

    Raises:
        RuntimeLimitError: naming the first layer beyond a limit and the sizes.
    """
    if len(layers) > MAX_LAYERS:
        raise RuntimeLimitError(
            f"the model has {len(layers):,} runtime layers; the C runtime plans at most "
            f"{MAX_LAYERS:,}"
        )
    for layer in layers:
        if not _fits(*layer.input_shape):
            raise _refuse(layer, f"its input of shape {layer.input_shape}")
        if not _fits(*layer.output_shape):
            raise _refuse(layer, f"its output of shape {layer.output_shape}")
        if layer.kind in (CONV2D, MAXPOOL, AVGPOOL):
            sizes = (*layer.kernel, *layer.stride, *layer.padding, *layer.dilation)
            if max(sizes) > MAX_DIMENSION:
                raise _refuse(layer, f"kernel {layer.kernel}, stride {layer.stride}, padding "
                                     f"{layer.padding}, dilation {layer.dilation}")  # fmt: skip
        if layer.kind == CONV2D:
            channels, height, width = layer.input_shape
            padded = (channels, height + 2 * layer.padding[0], width + 2 * layer.padding[1])
            if not _fits(*padded):
                raise _refuse(layer, f"its zero-padded input of shape {padded}")
            if not _fits(channels // layer.groups, *layer.kernel):
                raise _refuse(layer, f"a kernel of {channels // layer.groups} x {layer.kernel}")
        if layer.kind in (DENSE, CONV2D) and not _fits(layer.out_channels, layer.fan_in):
            raise _refuse(
                layer, f"a weight of {layer.out_channels:,} x {layer.fan_in:,} = "
                f"{layer.out_channels * layer.fan_in:,} values"
            )  # fmt: skip


def check_plan(layers: list[LayerSpec], buffers, arena_floats: int) -> None:
    """Refuse the plans ``tp_plan_arena`` refuses: a buffer beyond 2^26 floats, buffers beyond
    2^30 floats together, an arena of 2^29 floats (2 GiB) or more.

    Raises:
        RuntimeLimitError: naming the layer of the buffer or the arena's size.
    """
    for buffer in buffers:
        if buffer.floats > MAX_ELEMENTS:
            owner = layers[buffer.layer] if buffer.layer >= 0 else layers[-1]
            raise _refuse(owner, f"a buffer of {buffer.floats:,} floats for its training step")
    placed = sum(buffer.floats for buffer in buffers)
    if placed > MAX_PLACED_FLOATS or arena_floats > MAX_ARENA_FLOATS:
        raise RuntimeLimitError(
            f"training this model needs an arena of {4 * arena_floats:,} bytes "
            f"({placed:,} floats of step buffers); the C runtime's arena is below 2 GiB "
            f"({4 * MAX_ARENA_FLOATS:,} bytes). Train fewer layers (a memory mode, "
            "--first-trained-layer) or use a smaller model"
        )


__all__ = ["RuntimeLimitError", "check_layers", "check_plan"]
