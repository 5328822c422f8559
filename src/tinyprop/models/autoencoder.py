"""Fully-connected autoencoder for anomalous sound detection (DCASE2020 Task 2 baseline style)."""

from __future__ import annotations

import math

import torch
from torch import nn


def autoencoder(
    input_shape: tuple[int, ...] = (640,), hidden: int = 64, bottleneck: int = 8
) -> nn.Sequential:
    """Dense autoencoder ``D-h-h-b-h-h-D`` with ReLU (the DCASE baseline is 640-128x4-8-128x4-640
    with BatchNorm; this one is smaller and has no BatchNorm).

    The output is the flat reconstruction ``(B, D)``, ``D = prod(input_shape)``; the anomaly score
    of a sample is its reconstruction error (see :func:`reconstruction_loss`).

    Args:
        input_shape: shape of one sample (e.g. 5 log-mel frames x 128 bands, flat: ``(640,)``).
        hidden: width of the hidden layers.
        bottleneck: width of the code layer.

    Returns:
        An ``nn.Sequential`` mapping ``(B, *input_shape)`` to ``(B, D)``.

    Example:
        >>> autoencoder((5, 64))(torch.zeros(2, 5, 64)).shape
        torch.Size([2, 320])
    """
    features = math.prod(input_shape)
    return nn.Sequential(
        nn.Flatten(),  # (B, D)
        nn.Linear(features, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, bottleneck),  # (B, b)
        nn.ReLU(),
        nn.Linear(bottleneck, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, features),  # (B, D)
    )


def reconstruction_loss(reconstruction: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample between a flat reconstruction ``(B, D)`` and ``x``.

    Example:
        >>> reconstruction_loss(torch.zeros(2, 4), torch.ones(2, 2, 2))
        tensor([1., 1.])
    """
    return ((reconstruction - x.flatten(1)) ** 2).mean(dim=1)  # (B,)
