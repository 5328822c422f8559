"""1-D CNN for human activity recognition over (channels, steps) inertial windows."""

from __future__ import annotations

from torch import nn


def cnn1d(
    num_classes: int = 4, input_shape: tuple[int, ...] = (6, 100), channels: int = 16
) -> nn.Sequential:
    """Three 1-D convs (kernel 5; channels, 2x, 2x) with ReLU, two max pools, an average pool.

    Only Conv1d, ReLU, MaxPool1d, AvgPool1d, Flatten and Linear, so the C runtime can run it.
    BasicMotions (the offline substitute) is ``(6, 100)``; UCI HAR is ``(9, 128)``.

    Args:
        num_classes: number of output logits.
        input_shape: ``(sensor channels, time steps)``.
        channels: channels of the first conv.

    Returns:
        An ``nn.Sequential`` mapping ``(B, C, T)`` to ``(B, num_classes)``.

    Example:
        >>> cnn1d(6, (9, 128))(torch.zeros(2, 9, 128)).shape
        torch.Size([2, 6])
    """
    if len(input_shape) != 2:
        raise ValueError(f"the HAR CNN needs input_shape (channels, steps), got {input_shape}")
    sensor_channels, steps = input_shape
    if steps < 4:
        raise ValueError(f"the HAR CNN needs at least 4 time steps, got {steps}")
    return nn.Sequential(
        nn.Conv1d(sensor_channels, channels, 5, padding=2),  # (B, c, T)
        nn.ReLU(),
        nn.MaxPool1d(2),  # (B, c, T/2)
        nn.Conv1d(channels, 2 * channels, 5, padding=2),  # (B, 2c, T/2)
        nn.ReLU(),
        nn.MaxPool1d(2),  # (B, 2c, T/4)
        nn.Conv1d(2 * channels, 2 * channels, 5, padding=2),  # (B, 2c, T/4)
        nn.ReLU(),
        nn.AvgPool1d(steps // 4),  # (B, 2c, 1)
        nn.Flatten(),
        nn.Linear(2 * channels, num_classes),  # (B, num_classes)
    )
