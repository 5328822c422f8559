"""DS-CNN (small) keyword-spotting model (MLPerf Tiny), without BatchNorm for the C runtime."""

from __future__ import annotations

from torch import nn


def ds_cnn(
    num_classes: int = 12,
    input_shape: tuple[int, ...] = (1, 49, 10),
    channels: int = 64,
    blocks: int = 4,
) -> nn.Sequential:
    """DS-CNN-S: a 10x4 stride-2 conv, ``blocks`` depthwise-separable blocks, average pool, linear.

    Only Conv2d (incl. depthwise), ReLU, AvgPool2d, Flatten and Linear, so that the C runtime can
    run it (MLPerf Tiny's version has BatchNorm after each conv; this one has biases instead).

    Args:
        num_classes: number of output logits (12 for the Speech Commands task).
        input_shape: ``(1, frames, coefficients)`` of the MFCC features (49x10 by default).
        channels: channels of every conv layer.
        blocks: number of depthwise-separable blocks.

    Returns:
        An ``nn.Sequential`` mapping ``(B, 1, T, F)`` to ``(B, num_classes)``.

    Example:
        >>> ds_cnn()(torch.zeros(2, 1, 49, 10)).shape
        torch.Size([2, 12])
    """
    if len(input_shape) != 3:
        raise ValueError(f"DS-CNN needs input_shape (1, frames, coefficients), got {input_shape}")
    in_channels, frames, coefficients = input_shape
    if frames < 10 or coefficients < 4:
        raise ValueError(f"DS-CNN needs at least 10 frames and 4 coefficients, got {input_shape}")
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, channels, (10, 4), 2, (5, 1)),  # (B, c, ~T/2, ~F/2)
        nn.ReLU(),
    ]
    for _ in range(blocks):
        layers += [
            nn.Conv2d(channels, channels, 3, 1, 1, groups=channels),  # depthwise
            nn.ReLU(),
            nn.Conv2d(channels, channels, 1),  # pointwise
            nn.ReLU(),
        ]
    out_frames = (frames + 2 * 5 - 10) // 2 + 1
    out_coefficients = (coefficients + 2 * 1 - 4) // 2 + 1
    layers += [
        nn.AvgPool2d((out_frames, out_coefficients)),  # (B, c, 1, 1)
        nn.Flatten(),
        nn.Linear(channels, num_classes),  # (B, num_classes)
    ]
    return nn.Sequential(*layers)
