"""What an activation whose derivative needs its input costs in the C runtime's arena: the
example models (HAR 1-D CNN, keyword DS-CNN) as built, and with every ReLU replaced by SiLU or
Hardswish (which keep their input for their backward, where a ReLU works in place and, before
a bias-only layer, keeps a 1-bit mask), under each of their Cortex-M4 memory modes; arena
bytes from the runtime's plan (``tinyprop.export.arena``, equal to ``tp_arena_bytes_mode``).

    python benchmarks/activation_memory.py
"""

from __future__ import annotations

import copy

from torch import nn

from tinyprop import models
from tinyprop.export.graph import arena_bytes, describe
from tinyprop.memory import modes_for

EXAMPLES = {"HAR 1-D CNN": ("har", (6, 100)), "DS-CNN (keyword)": ("speech_commands", (1, 49, 10))}
ACTIVATIONS = {"ReLU": None, "SiLU": nn.SiLU, "Hardswish": nn.Hardswish}


def with_activation(model: nn.Module, activation) -> nn.Module:
    """A copy of ``model`` with every nn.ReLU replaced by ``activation()`` (None: as it is)."""
    model = copy.deepcopy(model)
    if activation is None:
        return model
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.ReLU):
                setattr(parent, name, activation())
    return model


def main() -> int:
    print("| model | mode | " + " | ".join(f"arena with {name}" for name in ACTIVATIONS) + " |")
    print("|---|---|" + "---:|" * len(ACTIVATIONS))
    for title, (dataset, shape) in EXAMPLES.items():
        base = models.build(dataset, input_shape=shape)
        layers = {n: describe(with_activation(base, a), shape) for n, a in ACTIVATIONS.items()}
        for mode in (m for m in modes_for(dataset) if m.on_device):
            cells = [
                arena_bytes(layers[name], "tinypropv2", mode.optimizer, mode.momentum, mode.memory)
                for name in ACTIVATIONS
            ]
            print(f"| {title} | {mode.name} | " + " | ".join(f"{c:,}" for c in cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
