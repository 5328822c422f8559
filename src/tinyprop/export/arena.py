"""The C runtime's arena plan, computed in Python exactly as ``runtime/src/plan.c`` does.

Persistent buffers: the trained layers' parameters (a bias-only layer's bias), their gradients (none
with ``sgd_in_place`` or ``momentum_in_place``) and the optimizer state (Adam: two moments; SGD with
momentum: one). Then the transient buffers of one training step, each alive over a range of steps:
with L layers the forward of layer i is step i, the loss step L, the backward of layer i step 2L - i
(the backward stops at the first trained layer F). A bias-only layer's input is not kept for its
backward; a ReLU right before it keeps a bit mask of its output (one 32-bit word per 32 entries)
from its forward to its backward instead. A conv's padded copies (input, input error) hold one
group's channels (a grouped conv pads one group at a time). They are placed greedily by size: each
at the lowest offset (0 or the end of a placed buffer alive at an overlapping step) where it
overlaps no placed buffer alive at an overlapping step, so memory is reused once a buffer's last
reader (often its backward) has run.

Example:
    >>> plan = plan_arena(describe(net, (1, 28, 28)), "full", "sgd", 0.0, MemoryMode(1))
    >>> plan.bytes, plan.transient_floats
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tinyprop.export.graph import (
    ACTIVATIONS,
    AVGPOOL,
    CONV2D,
    FLATTEN,
    INPUT_ACTIVATIONS,
    MAXPOOL,
    RELU,
    LayerSpec,
)
from tinyprop.export.limits import check_plan
from tinyprop.memory import MemoryMode

IN_PLACE = (*ACTIVATIONS, FLATTEN)  # layers that work on their input and its error in place
# layers whose backward works on the error in place (SiLU and the like: an output of their
# own, the error in place)
ERROR_IN_PLACE = (*IN_PLACE, *INPUT_ACTIVATIONS)

RADIX_COUNTS = 256  # selection_in_place: the radix select's table (TP_RADIX_COUNTS)
# tp_buffer_use of plan.c
(
    OUTPUT,
    FORWARD_SCRATCH,
    LOSS_DELTA,
    INPUT_DELTA,
    BACKWARD_SCRATCH,
    SELECTION,
    GRADIENT,
    RELU_MASK,
    RECOMPUTED_INPUT,
    RECOMPUTE_PARTNER,
    RECOMPUTE_SCRATCH,
) = range(11)
MOMENT_BLOCK = 64  # moment_bits 8: entries per block (tinyprop.moments.BLOCK)


@dataclass
class Buffer:
    """One transient buffer: its size in floats, the steps it is alive, and its place."""

    floats: int
    first: int
    last: int
    layer: int  # -1 for the loss error
    use: int
    offset: int = 0


@dataclass
class ArenaPlan:
    """Floats of each part of the arena; ``bytes`` equals ``tp_arena_bytes_mode``."""

    parameters: int  # the trained layers' weights and biases
    gradients: int
    moments: int  # optimizer state
    transient_floats: int  # extent of the placed transient buffers
    first_trained: int  # index into the layer list of the first trained layer
    buffers: list[Buffer]

    @property
    def bytes(self) -> int:
        """The whole arena in bytes (every buffer holds 4-byte floats or int32s)."""
        return 4 * (self.parameters + self.gradients + self.moments + self.transient_floats)


def layer_parameters(layer: LayerSpec) -> int:
    """Weights and biases of a dense or conv layer."""
    return layer.out_channels * layer.fan_in + (layer.out_channels if layer.has_bias else 0)


def trained_flags(layers: list[LayerSpec], mode: MemoryMode) -> list[bool]:
    """Per layer: a dense or conv layer at or after the mode's first trained one."""
    trainable = [index for index, layer in enumerate(layers) if layer.trainable]
    if not 0 <= mode.first_trained_layer < len(trainable):
        raise ValueError(
            f"first_trained_layer must lie in [0, {len(trainable)}) for this model (it has "
            f"{len(trainable)} dense/conv layers), got {mode.first_trained_layer}"
        )
    first = trainable[mode.first_trained_layer]
    return [layer.trainable and index >= first for index, layer in enumerate(layers)]


def _flags_of(layers: list[LayerSpec], numbers: tuple[int, ...], name: str) -> list[bool]:
    """Per layer: whether it is one of the dense/conv layers ``numbers`` (counted from 0).

    Raises:
        ValueError: when such a layer does not exist.
    """
    trainable = [index for index, layer in enumerate(layers) if layer.trainable]
    flags = [False] * len(layers)
    for number in numbers:
        if number >= len(trainable):
            raise ValueError(
                f"{name} must lie in [0, {len(trainable)}) for this model, got {numbers}"
            )
        flags[trainable[number]] = True
    return flags


def bias_only_flags(layers: list[LayerSpec], mode: MemoryMode) -> list[bool]:
    """Per layer: a trained layer whose bias alone trains (``mode.bias_only_layers``).

    Raises:
        ValueError: when such a layer does not exist or has no bias.
    """
    flags = _flags_of(layers, mode.bias_only_layers, "bias_only_layers")
    for number in mode.bias_only_layers:
        if number >= 32:
            raise ValueError(f"bias_only_layers: the runtime handles layers 0..31, got {number}")
    dense_or_conv = [layer for layer in layers if layer.trainable]
    for number in mode.bias_only_layers:
        if not dense_or_conv[number].has_bias:
            raise ValueError(f"bias_only_layers: layer {number} has no bias to train")
    return flags


def trained_parameters(layer: LayerSpec, bias_only: bool) -> int:
    """Parameters a trained layer keeps in the arena (a bias-only layer: its bias)."""
    return layer.out_channels if bias_only else layer_parameters(layer)


def moment_blocks(layer: LayerSpec, bias_only: bool) -> int:
    """Blocks of :data:`MOMENT_BLOCK` entries of a trained layer's tensors (weight, bias)."""
    weights = 0 if bias_only else -(-(layer.out_channels * layer.fan_in) // MOMENT_BLOCK)
    return weights + (-(-layer.out_channels // MOMENT_BLOCK) if layer.has_bias else 0)


def moment_floats(parameters: int, blocks: int, bits: int) -> int:
    """Adam's two moments: 2 floats per parameter, or with 8 bits two codes per parameter
    (each array rounded up to whole floats) and two block maxima per block."""
    return 2 * parameters if bits == 32 else 2 * (-(-parameters // 4)) + 2 * blocks


def recompute_flags(layers: list[LayerSpec], mode: MemoryMode) -> list[bool]:
    """Per layer: a trained layer whose input is computed again for its backward.

    Raises:
        ValueError: when such a layer does not exist.
    """
    return _flags_of(layers, mode.recompute_layers, "recompute_layers")


def _recompute_reader(layers: list[LayerSpec], i: int) -> int:
    """Last step that reads the recomputed input of layer i: its backward, or the backward of
    an activation working in place on it (the layers right before i that alias their input)."""
    last, k = 2 * len(layers) - i, i - 1
    while k > 0 and layers[k].kind in IN_PLACE:
        if layers[k].kind in ACTIVATIONS:
            last = 2 * len(layers) - k
        k -= 1
    return last


def recompute_consumer(layers: list[LayerSpec], recompute: list[bool], i: int) -> bool:
    """Layer i aliases its input (an activation in place, Flatten) and the next layer that does
    not recomputes its input: i's output is then that recomputed input."""
    k = i + 1
    while k < len(layers) and layers[k].kind in IN_PLACE:
        k += 1
    return k < len(layers) and recompute[k]


def keeps_mask(layers: list[LayerSpec], bias_only: list[bool], i: int) -> bool:
    """A ReLU right before a bias-only layer keeps a bit mask of its output instead."""
    return layers[i].kind == RELU and i + 1 < len(layers) and bias_only[i + 1]


def _padded(layer: LayerSpec) -> tuple[int, bool]:
    channels, height, width = layer.input_shape
    per_group = channels // layer.groups  # a grouped conv pads one group at a time
    size = per_group * (height + 2 * layer.padding[0]) * (width + 2 * layer.padding[1])
    return size, layer.padding != (0, 0)


def conv_forward_scratch(layer: LayerSpec) -> int:
    """``tp_conv_forward_scratch_floats``: the padded input (when padding) and two tables."""
    padded, pads = _padded(layer)
    return (padded if pads else 0) + 2 * layer.fan_in


def conv_backward_scratch(layer: LayerSpec, writes_input_delta: bool, reads_input: bool) -> int:
    """``tp_conv_backward_scratch_floats`` (reads_input False for a bias-only layer)."""
    padded, pads = _padded(layer)
    plane = layer.output_shape[1] * layer.output_shape[2]
    return (
        (padded if pads and reads_input else 0)
        + 2 * layer.fan_in
        + (padded if pads and writes_input_delta else 0)
        + 2 * layer.fan_in
        + plane
        + 1
        + layer.out_channels
    )


def _error_reader(layers: list[LayerSpec], j: int) -> int:
    """Step of the backward that reads the error of layer j's input (past in-place layers)."""
    k = j - 1
    while k > 0 and layers[k].kind in ERROR_IN_PLACE:
        k -= 1
    return 2 * len(layers) - k


def _add_recompute(
    layers: list[LayerSpec], storage: list[int], i: int, writes_input_delta: bool, add
) -> None:
    """The buffers of layer i's recomputed input: the forward of the layers before it runs
    again from the sample, its outputs alternating between the recomputed input (the last one
    lands there) and a partner: the error of i's input (written only after) when it is large
    enough, else a buffer of its own; the convs' forward scratch."""
    step = 2 * len(layers) - i
    outputs = [j for j in range(i) if storage[j] == j]
    largest = max(layers[j].output_size for j in outputs)
    add(largest, step, _recompute_reader(layers, i), i, RECOMPUTED_INPUT)
    partner_is_error = writes_input_delta and math.prod(layers[i].input_shape) >= largest
    if len(outputs) > 1 and not partner_is_error:
        add(largest, step, step, i, RECOMPUTE_PARTNER)
    scratch = [conv_forward_scratch(layers[j]) for j in range(i) if layers[j].kind == CONV2D]
    add(max(scratch, default=0), step, step, i, RECOMPUTE_SCRATCH)


def _place(buffers: list[Buffer]) -> int:
    order = sorted(range(len(buffers)), key=lambda i: (-buffers[i].floats, i))
    placed: list[Buffer] = []
    extent = 0
    for index in order:
        buffer = buffers[index]
        alive = [b for b in placed if b.first <= buffer.last and buffer.first <= b.last]
        best = None
        for candidate in [0] + [b.offset + b.floats for b in alive]:
            if best is not None and candidate >= best:
                continue
            if all(
                candidate >= b.offset + b.floats or b.offset >= candidate + buffer.floats
                for b in alive
            ):
                best = candidate
        buffer.offset = best
        extent = max(extent, best + buffer.floats)
        placed.append(buffer)
    return extent


def plan_arena(
    layers: list[LayerSpec],
    policy: str,
    optimizer: str,
    momentum: float,
    mode: MemoryMode | None = None,
) -> ArenaPlan:
    """The arena of ``tp_init_mode`` for these layers, policy, optimizer and memory mode.

    Args:
        layers: from :func:`tinyprop.export.graph.describe`.
        policy: ``full``, ``topk``, ``tinyprop`` or ``tinypropv2``.
        optimizer: ``sgd`` or ``adam``.
        momentum: SGD momentum (0: no momentum buffer).
        mode: the memory mode; every layer trained when omitted.
    """
    mode = mode or MemoryMode()
    mode.check(optimizer, momentum)
    trained = trained_flags(layers, mode)
    bias_only = bias_only_flags(layers, mode)
    recompute = recompute_flags(layers, mode)
    if mode.sgd_in_place and any(bias_only):
        raise ValueError("bias_only_layers do not work with sgd_in_place (not built)")
    first = trained.index(True)
    count = len(layers)
    parameters = sum(
        trained_parameters(x, b) for x, t, b in zip(layers, trained, bias_only, strict=True) if t
    )
    blocks = sum(
        moment_blocks(x, b) for x, t, b in zip(layers, trained, bias_only, strict=True) if t
    )
    gradients = 0 if mode.in_place or mode.momentum_in_place else parameters
    if optimizer == "adam":
        moments = moment_floats(parameters, blocks, mode.moment_bits)
    else:
        moments = parameters if momentum else 0
    storage, last_use, current_is_sample = [], list(range(count)), True
    for i, layer in enumerate(layers):
        aliases = layer.kind == FLATTEN or (layer.kind in ACTIVATIONS and not current_is_sample)
        storage.append((storage[i - 1] if i > 0 else -1) if aliases else i)
        if not aliases:
            current_is_sample = False
    for i, layer in enumerate(layers):
        source = storage[i - 1] if i > 0 else -1
        if source >= 0:
            last_use[source] = max(last_use[source], i)
        if i < first:
            continue
        reads_input = (trained[i] and not bias_only[i] and not recompute[i]) or (
            layer.kind in (MAXPOOL, AVGPOOL, *INPUT_ACTIVATIONS)
        )
        if source >= 0 and reads_input:
            last_use[source] = max(last_use[source], 2 * count - i)
        if (
            layer.kind in ACTIVATIONS
            and storage[i] >= 0
            and not keeps_mask(layers, bias_only, i)
            and not recompute_consumer(layers, recompute, i)
        ):
            last_use[storage[i]] = max(last_use[storage[i]], 2 * count - i)
    if storage[-1] >= 0:
        last_use[storage[-1]] = max(last_use[storage[-1]], count)
    buffers: list[Buffer] = []

    def add(floats: int, start: int, end: int, layer: int, use: int) -> None:
        if floats > 0:
            buffers.append(Buffer(floats, start, end, layer, use))

    for i, layer in enumerate(layers):
        if storage[i] == i:
            add(layer.output_size, i, last_use[i], i, OUTPUT)
        if layer.kind == CONV2D:
            add(conv_forward_scratch(layer), i, i, i, FORWARD_SCRATCH)
        if i >= first and keeps_mask(layers, bias_only, i):
            add(-(-layer.output_size // 32), i, 2 * count - i, i, RELU_MASK)
    add(layers[-1].output_size, count, _error_reader(layers, count), -1, LOSS_DELTA)
    for i in range(count - 1, first - 1, -1):
        layer, step = layers[i], 2 * count - i
        if i > first and (trained[i] or layer.kind in (MAXPOOL, AVGPOOL)):
            add(math.prod(layer.input_shape), step, _error_reader(layers, i), i, INPUT_DELTA)
        if not trained[i]:
            continue
        if layer.kind == CONV2D:
            add(
                conv_backward_scratch(layer, i > first, not bias_only[i]),
                step,
                step,
                i,
                BACKWARD_SCRATCH,
            )
        if policy != "full" and not (i == first and bias_only[i]):
            floats = RADIX_COUNTS if mode.selection_in_place else 2 * layer.output_size
            add(floats, step, step, i, SELECTION)
        if (mode.sgd_in_place and layer.kind == CONV2D) or mode.adam_in_place:
            add(trained_parameters(layer, bias_only[i]), step, step, i, GRADIENT)
        if recompute[i]:
            _add_recompute(layers, storage, i, i > first, add)
    transient = _place(buffers)
    check_plan(layers, buffers, parameters + gradients + moments + transient)
    return ArenaPlan(parameters, gradients, moments, transient, first, buffers)


__all__ = [
    "ArenaPlan",
    "Buffer",
    "bias_only_flags",
    "layer_parameters",
    "plan_arena",
    "trained_flags",
    "trained_parameters",
]
