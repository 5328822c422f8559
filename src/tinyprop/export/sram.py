"""The SRAM the exported example program needs on a Cortex-M4, and the memory modes that would
make a model fit a given size.

Besides the training arena and the one-sample input buffer, a program needs its own data (the
runtime's ``tp_model``, one record per layer, and the C library's), the heap the C library's
stdio takes and the stack. The figures below were measured on the exported example built
with ``arm-none-eabi-gcc -O2 -mcpu=cortex-m4 -mthumb -mfloat-abi=hard -mfpu=fpv4-sp-d16``
(GCC 12.2, newlib with semihosting): data + bss from ``arm-none-eabi-size``, the stack as the
worst case read from the machine code (``benchmarks/stack_usage.py``; stack painting under
QEMU never went deeper), the heap under QEMU. ``tests/test_sram.py`` builds the example again
for several layer counts and fails when a figure moves, and runs a model exported for exactly
its estimate under QEMU with the stack at the top of that SRAM. Another compiler or C library
needs other figures: treat them as the example's, and replace ``printf`` by your own logging to
save most of the heap and stack beyond the runtime's.

Example:
    >>> estimate = sram_estimate(layer_count=11, arena_bytes=54_648, sample_bytes=2_400)
    >>> estimate.total_bytes, estimate.stack_bytes
    (68896, 3348)
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from tinyprop.config import TinyPropConfig
from tinyprop.export import arena
from tinyprop.export.footprint import footprint_of_layers
from tinyprop.export.graph import LayerSpec
from tinyprop.export.runtime import OptimizerSpec
from tinyprop.memory import MemoryMode

# data + bss of the example besides the arena, the sample buffer and the layer records: the C
# library's data and the runtime's model and batch state without their per-layer arrays
PROGRAM_DATA_BYTES = 3416
LAYER_DATA_BYTES = 188  # per runtime layer: its tp_layer record and its saved running maximum
# newlib's stdio buffers come from malloc, which grows the heap to 12 bytes past a page (4096
# bytes) boundary, counted from the start of RAM: the heap ends at the first such point that
# leaves room for the buffers. Their size: at most 2,908 bytes when the program reads its
# samples (stdin's and stdout's buffers; measured under QEMU with the stack painting of
# runtime/examples/cortex_m4/stack_paint.c), about 1,270 when they are built in (stdout's)
HEAP_NEED_BYTES = 2908
HEAP_PAGE_BYTES = 4096
HEAP_PAST_PAGE_BYTES = 12
# the deepest stack: main -> printf (newlib's vfprintf formats a float), or main ->
# tp_init_mode, whose arena plan holds 9 buffer records of 12 bytes and two int16 per runtime
# layer; the training calls (tp_batch_add, tp_batch_end) take at most 1,120 bytes. main's
# frame is 96 bytes when the program reads the samples, 104 when they are built in: the larger
# one counts
STACK_PRINTF_BYTES = 3348
STACK_INIT_BYTES = 416
STACK_INIT_LAYER_BYTES = 112


@dataclass(frozen=True)
class SramEstimate:
    """Bytes of SRAM the exported example needs on a Cortex-M4, by part."""

    arena_bytes: int  # the training arena (TP_MODEL_ARENA_BYTES)
    sample_bytes: int  # the one-sample input buffer
    program_data_bytes: int  # the runtime's model state and the C library's data
    heap_bytes: int  # the C library's stdio buffers, up to the page its malloc rounds to
    stack_bytes: int  # the deepest stack

    @property
    def total_bytes(self) -> int:
        return (
            self.arena_bytes
            + self.sample_bytes
            + self.program_data_bytes
            + self.heap_bytes
            + self.stack_bytes
        )

    def describe(self) -> str:
        """``arena A, one sample S, program data D, heap H, stack K``."""
        return (
            f"arena {self.arena_bytes:,}, one sample {self.sample_bytes:,}, program and C "
            f"library data {self.program_data_bytes:,}, heap {self.heap_bytes:,}, stack "
            f"{self.stack_bytes:,}"
        )


def stack_bytes(layer_count: int) -> int:
    """The example's deepest stack on a Cortex-M4 with ``-DTP_MAX_LAYERS=layer_count``."""
    return max(STACK_PRINTF_BYTES, STACK_INIT_BYTES + STACK_INIT_LAYER_BYTES * layer_count)


def sram_estimate(layer_count: int, arena_bytes: int, sample_bytes: int) -> SramEstimate:
    """What the exported example needs on a Cortex-M4 built with ``-DTP_MAX_LAYERS=
    layer_count`` (the exported Makefile's value: the model's runtime layer count).

    Args:
        layer_count: the model's runtime layers (``len(export_c(...).layers)``).
        arena_bytes: the training arena (``export_c(...).arena_bytes``).
        sample_bytes: the example's one-sample input buffer (4 bytes per input value).

    Returns:
        :class:`SramEstimate`; ``export_c(...).sram`` is this for the exported model.

    Example:
        >>> sram_estimate(11, 54_648, 2_400).total_bytes  # the HAR CNN, last2-sgd-in-place
        68896
    """
    program_data = PROGRAM_DATA_BYTES + LAYER_DATA_BYTES * layer_count
    static = arena_bytes + sample_bytes + program_data  # data + bss: the heap starts there
    pages = -(-(static + HEAP_NEED_BYTES - HEAP_PAST_PAGE_BYTES) // HEAP_PAGE_BYTES)
    return SramEstimate(
        arena_bytes=arena_bytes,
        sample_bytes=sample_bytes,
        program_data_bytes=program_data,
        heap_bytes=pages * HEAP_PAGE_BYTES + HEAP_PAST_PAGE_BYTES - static,
        stack_bytes=stack_bytes(layer_count),
    )


BUFFER_USES = {
    arena.OUTPUT: "output",
    arena.FORWARD_SCRATCH: "forward scratch",
    arena.LOSS_DELTA: "error",
    arena.INPUT_DELTA: "input's error",
    arena.BACKWARD_SCRATCH: "backward scratch",
    arena.SELECTION: "top-k selection scratch",
    arena.GRADIENT: "gradient of its in-place step",
    arena.RELU_MASK: "ReLU mask",
    arena.RECOMPUTED_INPUT: "recomputed input",
    arena.RECOMPUTE_PARTNER: "recomputed input's partner",
    arena.RECOMPUTE_SCRATCH: "recomputation scratch",
}


def largest_parts(
    layers: list[LayerSpec], config: TinyPropConfig, optimizer: OptimizerSpec, mode: MemoryMode
) -> str:
    """Where the arena's bytes go: trained parameters, gradients, optimizer state and one
    step's buffers, each with its largest layer or buffer (what to shrink first)."""
    plan = arena.plan_arena(layers, config.policy, optimizer.kind, optimizer.momentum, mode)
    trained = arena.trained_flags(layers, mode)
    bias_only = arena.bias_only_flags(layers, mode)
    count, index = max(
        (arena.trained_parameters(x, b), i)
        for i, (x, t, b) in enumerate(zip(layers, trained, bias_only, strict=True))
        if t
    )  # (ties: the last such layer)
    layer = layers[index]
    parts = [
        f"trained parameters {4 * plan.parameters:,} (the largest: layer '{layer.path}' "
        f"({layer.module_type}), {4 * count:,})"
    ]
    for name, floats in (("gradients", plan.gradients), ("optimizer state", plan.moments)):
        if floats:
            parts.append(f"{name} {4 * floats:,}")
    if plan.buffers:
        buffer = max(plan.buffers, key=lambda b: b.floats)
        owner = layers[buffer.layer] if buffer.layer >= 0 else layers[-1]
        use = "loss's error" if buffer.layer < 0 else BUFFER_USES[buffer.use]
        parts.append(
            f"one step's buffers {4 * plan.transient_floats:,} (the largest: layer "
            f"'{owner.path}' ({owner.module_type})'s {use}, {4 * buffer.floats:,})"
        )
    return "The arena holds " + ", ".join(parts)


def mode_flags(mode: MemoryMode) -> str:
    """The ``tinyprop export`` options that give ``mode``."""
    flags = []
    if mode.first_trained_layer:
        flags.append(f"--first-trained-layer {mode.first_trained_layer}")
    for name, on in (
        ("--sgd-in-place", mode.sgd_in_place),
        ("--momentum-in-place", mode.momentum_in_place),
        ("--selection-in-place", mode.selection_in_place),
        ("--adam-in-place", mode.adam_in_place),
    ):
        if on:
            flags.append(name)
    if mode.moment_bits != 32:
        flags.append(f"--moment-bits {mode.moment_bits}")
    for name, layers in (
        ("--bias-only-layers", mode.bias_only_layers),
        ("--recompute-layers", mode.recompute_layers),
    ):
        if layers:
            flags.append(f"{name} {' '.join(map(str, layers))}")
    return " ".join(flags) or "(every layer trained, no memory mode)"


def candidate_modes(
    mode: MemoryMode, trainable: int, config: TinyPropConfig, optimizer: OptimizerSpec
) -> list[MemoryMode]:
    """Memory modes to try on top of ``mode``, those that train the most layers first: the
    optimizer's in-place update (8-bit moments for Adam), selection in place for a sparse
    policy, then training only the last layers (each with the same savings)."""
    savings: list[dict] = [{}]
    if optimizer.kind == "adam":
        savings += [{"moment_bits": 8}, {"adam_in_place": True, "moment_bits": 8}]
    elif optimizer.momentum == 0:
        savings.append({"sgd_in_place": True})
    elif not optimizer.nesterov:
        savings.append({"momentum_in_place": True})
    if config.policy != "full":
        savings += [{**saving, "selection_in_place": True} for saving in savings]
    candidates = []
    for first in range(mode.first_trained_layer, trainable):
        for saving in savings:
            try:
                candidate = replace(mode, first_trained_layer=first, **saving)
            except (TypeError, ValueError):
                continue
            if candidate != mode and candidate not in candidates:
                candidates.append(candidate)
    return candidates


def fitting_modes(
    layers: list[LayerSpec],
    config: TinyPropConfig,
    optimizer: OptimizerSpec,
    mode: MemoryMode,
    ram_bytes: int,
    sample_bytes: int,
    limit: int = 3,
) -> list[tuple[MemoryMode, SramEstimate]]:
    """Up to ``limit`` memory modes (see :func:`candidate_modes`) under which the example fits
    ``ram_bytes``, with their estimates: for each first trained layer the first one that fits,
    the most trained layers first."""
    trainable = sum(1 for layer in layers if layer.trainable)
    fitting: list[tuple[MemoryMode, SramEstimate]] = []
    for candidate in candidate_modes(mode, trainable, config, optimizer):
        if any(m.first_trained_layer == candidate.first_trained_layer for m, _ in fitting):
            continue
        try:
            report = footprint_of_layers(layers, config, optimizer, candidate)
        except (TypeError, ValueError):
            continue  # a mode this model or optimizer cannot take
        estimate = sram_estimate(len(layers), report.arena_bytes, sample_bytes)
        if estimate.total_bytes <= ram_bytes:
            fitting.append((candidate, estimate))
            if len(fitting) == limit:
                break
    return fitting
