"""Training RAM and flash of a model under a memory mode, before anything is exported.

The arena figures are the runtime's own (``tp_arena_bytes_mode``, computed by
:func:`tinyprop.export.arena.plan_arena`, tested equal to the C arena). Flash holds the
initial weights of every layer as ``const float`` arrays (a frozen layer's are read from there
for good) plus the program's code, which only the compiler knows (``make -C runtime
cortex-m4`` measures it for the example models).

Example:
    >>> report = footprint(net, (1, 49, 10), TinyPropConfig("tinypropv2"),
    ...                    OptimizerSpec("adam"), MemoryMode(8))
    >>> report.arena_bytes, report.weight_flash_bytes
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from tinyprop.config import TinyPropConfig
from tinyprop.export.arena import (
    bias_only_flags,
    layer_parameters,
    plan_arena,
    trained_flags,
    trained_parameters,
)
from tinyprop.export.frozen import mode_of_frozen_layers
from tinyprop.export.graph import LayerSpec, describe, inference_bytes
from tinyprop.export.runtime import OptimizerSpec
from tinyprop.memory import MemoryMode


@dataclass(frozen=True)
class MemoryReport:
    """Bytes a model needs on the device under a mode.

    Attributes:
        arena_bytes: the training arena (RAM), = ``tp_arena_bytes_mode``.
        parameter_bytes: trained weights and biases (in the arena).
        gradient_bytes: their gradients (0 with ``sgd_in_place`` or ``momentum_in_place``).
        optimizer_bytes: optimizer state (Adam: 2 per trained parameter; SGD momentum: 1).
        transient_bytes: one step's activations, errors and scratch, placed by liveness.
        trained_parameters, frozen_parameters: counts.
        weight_flash_bytes: every layer's initial weights as const floats (flash).
        inference_bytes: RAM of inference alone with the weights in flash.
    """

    arena_bytes: int
    parameter_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    transient_bytes: int
    trained_parameters: int
    frozen_parameters: int
    weight_flash_bytes: int
    inference_bytes: int


def footprint_of_layers(
    layers: list[LayerSpec], config: TinyPropConfig, optimizer: OptimizerSpec, mode: MemoryMode
) -> MemoryReport:
    """:class:`MemoryReport` of already described layers."""
    mode.check(optimizer.kind, optimizer.momentum, optimizer.nesterov)
    plan = plan_arena(layers, config.policy, optimizer.kind, optimizer.momentum, mode)
    trained = trained_flags(layers, mode)
    bias_only = bias_only_flags(layers, mode)
    counts = [layer_parameters(x) if x.trainable else 0 for x in layers]
    trained_count = sum(
        trained_parameters(x, b) for x, t, b in zip(layers, trained, bias_only, strict=True) if t
    )
    return MemoryReport(
        arena_bytes=plan.bytes,
        parameter_bytes=4 * plan.parameters,
        gradient_bytes=4 * plan.gradients,
        optimizer_bytes=4 * plan.moments,
        transient_bytes=4 * plan.transient_floats,
        trained_parameters=trained_count,
        frozen_parameters=sum(counts) - trained_count,
        weight_flash_bytes=4 * sum(counts),
        inference_bytes=inference_bytes(layers),
    )


def footprint(
    model: nn.Module,
    input_shape: tuple[int, ...],
    config: TinyPropConfig,
    optimizer: OptimizerSpec | None = None,
    mode: MemoryMode | None = None,
) -> MemoryReport:
    """RAM and flash of training ``model`` in the C runtime under ``mode``.

    Args:
        model: an ``nn.Sequential`` the exporter supports.
        input_shape: one sample's shape.
        config: the policy (sparse policies need selection scratch).
        optimizer: SGD (default) or Adam settings.
        mode: the memory mode; when omitted, the one that trains what the model trains
            (``requires_grad``, :mod:`tinyprop.export.frozen`).
    """
    layers = describe(model, input_shape)
    optimizer = optimizer or OptimizerSpec()
    mode = mode_of_frozen_layers(model, layers, mode, optimizer.parameters)
    return footprint_of_layers(layers, config, optimizer, mode)
