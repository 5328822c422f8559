"""The name the exporter gives a module in its messages and in the exported header.

A model applied with ``tinyprop.apply`` holds tinyprop's sparse layers (``TinyPropLinear``,
a ``ReLU`` marked for the layer after it, ...) where the user wrote PyTorch's; they compute
what the PyTorch layer computes, so an applied model's layers are named as the plain model's
are: by the PyTorch class they derive from. A user's own subclass keeps its own name.
"""

from __future__ import annotations

from torch import nn


def module_name(module: nn.Module) -> str:
    """The class name of ``module``; for one of tinyprop's layers, that of the nearest base
    class outside tinyprop (``TinyPropLinear`` -> ``Linear``; a block of tinyprop's models,
    derived from ``nn.Module`` alone, keeps its name)."""
    for cls in type(module).__mro__:
        if not cls.__module__.startswith("tinyprop."):
            return cls.__name__ if cls is not nn.Module else type(module).__name__
    return type(module).__name__
