"""Where a model's training arena goes under each memory mode (``tinyprop.memory.MODES``):
trained weights, gradients, optimizer state, and one step's buffers at the step where the most
floats are alive (layer inputs kept for a backward, errors, scratch, ReLU masks, in-place
gradients), from the runtime's own plan (``tinyprop.export.arena.plan_arena``).

    python benchmarks/memory_breakdown.py                                  # keyword DS-CNN
    python benchmarks/memory_breakdown.py --dataset har --policy tinypropv2
    python benchmarks/memory_breakdown.py --modes pointwise-adam first-bias-last2-adam

"placement slack" is the arena's step buffers minus the most floats alive at one step (the
greedy placement by size leaves that much unused); the RAM of a build adds its data and bss
outside the arena (``make -C runtime cortex-m4``: 14,368 B for the DS-CNN example).
"""

from __future__ import annotations

import argparse
import sys

from tinyprop import models
from tinyprop.config import TinyPropConfig
from tinyprop.export import arena
from tinyprop.export.graph import describe
from tinyprop.memory import TrainingMode, modes_for

PARTS = {  # buffer use -> the part it counts in
    arena.OUTPUT: "layer outputs / inputs kept for a backward",
    arena.FORWARD_SCRATCH: "conv scratch",
    arena.BACKWARD_SCRATCH: "conv scratch",
    arena.LOSS_DELTA: "errors (delta)",
    arena.INPUT_DELTA: "errors (delta)",
    arena.SELECTION: "selection scratch",
    arena.GRADIENT: "in-place gradient (one layer)",
    arena.RELU_MASK: "ReLU bit masks",
    arena.RECOMPUTED_INPUT: "recomputed input",
    arena.RECOMPUTE_PARTNER: "recomputed input",
    arena.RECOMPUTE_SCRATCH: "conv scratch",
}


def breakdown(layers, policy: str, mode: TrainingMode) -> dict[str, int]:
    """Bytes per part of the arena of ``mode`` (persistent parts, then the busiest step's)."""
    plan = arena.plan_arena(layers, policy, mode.optimizer, mode.momentum, mode.memory)
    steps = range(min(b.first for b in plan.buffers), max(b.last for b in plan.buffers) + 1)
    alive = {s: [b for b in plan.buffers if b.first <= s <= b.last] for s in steps}
    busiest = max(steps, key=lambda s: sum(b.floats for b in alive[s]))
    parts = {
        "trained weights and biases": 4 * plan.parameters,
        "gradients": 4 * plan.gradients,
        "optimizer state": 4 * plan.moments,
    }
    for buffer in alive[busiest]:
        name = PARTS[buffer.use]
        parts[name] = parts.get(name, 0) + 4 * buffer.floats
    parts["placement slack"] = 4 * (plan.transient_floats - sum(b.floats for b in alive[busiest]))
    parts["arena"] = plan.bytes
    parts["busiest step"] = busiest
    return parts


def trained_per_layer(layers, mode: TrainingMode) -> list[int]:
    """Trained parameters of each dense/conv layer (0: frozen), in forward order."""
    trained = arena.trained_flags(layers, mode.memory)
    bias_only = arena.bias_only_flags(layers, mode.memory)
    return [
        arena.trained_parameters(layer, b) if t else 0
        for layer, t, b in zip(layers, trained, bias_only, strict=True)
        if layer.trainable
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="speech_commands")
    parser.add_argument("--policy", default="full")
    parser.add_argument("--modes", nargs="+", help="only these modes (names); default: all")
    args = parser.parse_args(argv)
    reference = models.reference(args.dataset)
    layers = describe(models.build(args.dataset), reference.input_shape)
    TinyPropConfig(args.policy)  # a valid policy name
    for mode in modes_for(args.dataset):
        if args.modes and mode.name not in args.modes:
            continue
        parts = breakdown(layers, args.policy, mode)
        print(f"{args.dataset} {mode.name} ({args.policy}): arena {parts.pop('arena'):,} B, "
              f"busiest step {parts.pop('busiest step')}")  # fmt: skip
        for name, size in parts.items():
            if size:
                print(f"  {name:<44} {size:>9,} B")
        counts = " ".join(str(n) for n in trained_per_layer(layers, mode))
        print(f"  trained parameters per dense/conv layer: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
