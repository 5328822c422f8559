"""MNIST reference models: the MLP 784-128-64-10 (used by the demo) and a small CNN."""

from __future__ import annotations

import math

from torch import nn


def mlp(num_classes: int = 10, input_shape: tuple[int, ...] = (1, 28, 28)) -> nn.Sequential:
    """Multilayer perceptron ``prod(input_shape)-128-64-num_classes`` with ReLU.

    Args:
        num_classes: number of output logits.
        input_shape: shape of one sample; it is flattened.

    Returns:
        An ``nn.Sequential`` mapping ``(B, *input_shape)`` to ``(B, num_classes)``.

    Example:
        >>> mlp()(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    in_features = math.prod(input_shape)
    return nn.Sequential(
        nn.Flatten(),  # (B, 784)
        nn.Linear(in_features, 128),
        nn.ReLU(),
        nn.Linear(128, 64),
        nn.ReLU(),
        nn.Linear(64, num_classes),  # (B, num_classes)
    )


def cnn(num_classes: int = 10, input_shape: tuple[int, ...] = (1, 28, 28)) -> nn.Sequential:
    """Small CNN: two 3x3 conv (8, 16 channels) + ReLU + 2x2 max pool, then one linear layer.

    Args:
        num_classes: number of output logits.
        input_shape: ``(C, H, W)``; a flat ``(H*W,)`` square image is reshaped to ``(1, H, W)``.

    Returns:
        An ``nn.Sequential`` mapping ``(B, *input_shape)`` to ``(B, num_classes)``.

    Example:
        >>> cnn()(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    layers: list[nn.Module] = []
    if len(input_shape) == 1:
        side = math.isqrt(input_shape[0])
        if side * side != input_shape[0]:
            raise ValueError(
                f"the MNIST CNN needs an image input (C, H, W) or a flat square image, "
                f"got input_shape={input_shape}; pass input_shape=(1, 28, 28)"
            )
        layers.append(nn.Unflatten(1, (1, side, side)))
        input_shape = (1, side, side)
    if len(input_shape) != 3:
        raise ValueError(f"the MNIST CNN needs input_shape (C, H, W), got {input_shape}")
    channels, height, width = input_shape
    layers += [
        nn.Conv2d(channels, 8, 3, padding=1),  # (B, 8, H, W)
        nn.ReLU(),
        nn.MaxPool2d(2),  # (B, 8, H/2, W/2)
        nn.Conv2d(8, 16, 3, padding=1),  # (B, 16, H/2, W/2)
        nn.ReLU(),
        nn.MaxPool2d(2),  # (B, 16, H/4, W/4)
        nn.Flatten(),
        nn.Linear(16 * (height // 4) * (width // 4), num_classes),  # (B, num_classes)
    ]
    return nn.Sequential(*layers)
