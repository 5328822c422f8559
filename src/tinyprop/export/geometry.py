"""A layer's settings checked against its weights before the exporter reads them.

The exporter takes a layer's sizes from its attributes (``out_features``, ``kernel_size``,
``stride``, ...) and its values from its weight and bias. A whole model loaded from a file
(``torch.save(model)``) carries both, and nothing ties them together: a file whose Linear says
``out_features=6`` beside a weight of 3 x 4 was exported, and the C program read 24 floats of a
12-float array (past its end). Every setting is checked here to be what PyTorch itself would
build: whole numbers in range, and a weight and bias of exactly the shape the settings give.

Example:
    >>> layer = nn.Linear(4, 3)
    >>> layer.out_features = 6
    >>> check_geometry("0", layer)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: layer '0' (Linear): its weight is (3, 4) but out_features=6, in_features=4 ...
"""

from __future__ import annotations

import numpy as np
from torch import nn

from tinyprop.export.naming import module_name

POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d)
ADAPTIVE = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)


def _whole(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _sizes(value, lengths: tuple[int, ...], smallest: int, none: bool = False) -> bool:
    """``value`` is a whole number >= ``smallest``, or a tuple of ``lengths`` of them (None
    allowed where ``none``)."""
    parts = value if isinstance(value, (tuple, list)) else (value,)
    if isinstance(value, (tuple, list)) and len(parts) not in lengths:
        return False
    return all((none and part is None) or (_whole(part) and part >= smallest) for part in parts)


def _refuse(path: str, module: nn.Module, what: str) -> ValueError:
    return ValueError(
        f"layer '{path}' ({module_name(module)}): {what}; PyTorch would not build or run "
        "such a layer (a file edited or written by another program?): save the model again "
        "from PyTorch, or fix the setting"
    )


def _check_parameters(path: str, module: nn.Module, weight_shape: tuple, settings: str) -> None:
    """The weight and bias have the shapes the settings give."""
    weight = getattr(module, "weight", None)
    if weight is None or tuple(weight.shape) != weight_shape:
        shown = None if weight is None else tuple(weight.shape)
        raise _refuse(path, module, f"its weight is {shown} but {settings} give {weight_shape}")
    bias = getattr(module, "bias", None)
    if bias is not None and tuple(bias.shape) != weight_shape[:1]:
        raise _refuse(
            path, module, f"its bias is {tuple(bias.shape)} but {settings} give {weight_shape[:1]}"
        )


def check_geometry(path: str, module: nn.Module) -> None:
    """Raise a ValueError naming the layer when a Linear, convolution or pool has a setting
    PyTorch would refuse, or a weight or bias of another shape than its settings give."""
    if isinstance(module, nn.Linear):
        if not (_sizes(module.in_features, (), 1) and _sizes(module.out_features, (), 1)):
            raise _refuse(path, module, "in_features and out_features must be positive ints")
        _check_parameters(
            path, module, (module.out_features, module.in_features),
            f"out_features={module.out_features}, in_features={module.in_features}",
        )  # fmt: skip
    elif isinstance(module, (nn.Conv1d, nn.Conv2d)):
        rank = 2 if isinstance(module, nn.Conv2d) else 1
        counts = (module.in_channels, module.out_channels, module.groups)
        if not all(_sizes(count, (), 1) for count in counts):
            raise _refuse(
                path, module, "in_channels, out_channels and groups must be positive ints"
            )
        if module.in_channels % module.groups or module.out_channels % module.groups:
            raise _refuse(path, module, f"groups={module.groups} divides not both channel counts")
        for name, smallest in (("kernel_size", 1), ("stride", 1), ("dilation", 1)):
            if not _sizes(getattr(module, name), (rank,), smallest):
                raise _refuse(path, module, f"{name}={getattr(module, name)!r}")
        if module.padding not in ("same", "valid") and not _sizes(module.padding, (rank,), 0):
            raise _refuse(path, module, f"padding={module.padding!r}")
        kernel = tuple(module.kernel_size) if isinstance(module.kernel_size, (tuple, list)) else (
            (module.kernel_size,) * rank
        )  # fmt: skip
        shape = (module.out_channels, module.in_channels // module.groups, *kernel)
        settings = (
            f"out_channels={module.out_channels}, in_channels={module.in_channels}, "
            f"groups={module.groups}, kernel_size={module.kernel_size}"
        )
        _check_parameters(path, module, shape, settings)
    elif isinstance(module, POOLS):
        rank = 2 if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)) else 1
        settings = [("kernel_size", 1), ("padding", 0)] + (
            [("dilation", 1)] if hasattr(module, "dilation") else []
        )
        for name, smallest in settings:
            if not _sizes(getattr(module, name), (1, rank), smallest):
                raise _refuse(path, module, f"{name}={getattr(module, name)!r}")
        if module.stride is not None and not _sizes(module.stride, (1, rank), 1):
            raise _refuse(path, module, f"stride={module.stride!r}")
    elif isinstance(module, ADAPTIVE):
        rank = 2 if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) else 1
        if not _sizes(module.output_size, (rank,), 1, none=True):
            raise _refuse(path, module, f"output_size={module.output_size!r}")
