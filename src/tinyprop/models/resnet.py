"""ResNet-8-like CNN for 32x32 colour images (the MLPerf Tiny image-classification model)."""

from __future__ import annotations

import torch
from torch import nn


class ResidualBlock(nn.Module):
    """Two 3x3 conv + BatchNorm with a skip connection (1x1 conv when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W)
        y = self.relu1(self.bn1(self.conv1(x)))  # (B, C_out, H/s, W/s)
        y = self.bn2(self.conv2(y))
        return self.relu2(y + self.shortcut(x))  # (B, C_out, H/s, W/s)


def resnet8(
    num_classes: int = 10, input_shape: tuple[int, ...] = (3, 32, 32), width: int = 16
) -> nn.Sequential:
    """ResNet-8: a 3x3 stem and three residual stacks (width, 2*width, 4*width channels).

    With ``width=16`` this is the MLPerf Tiny CIFAR10 model (about 78k parameters, 12.5M MACs).

    Args:
        num_classes: number of output logits.
        input_shape: ``(C, H, W)`` of one sample.
        width: channels of the first stack.

    Returns:
        An ``nn.Sequential`` mapping ``(B, C, H, W)`` to ``(B, num_classes)``.

    Example:
        >>> resnet8(100)(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 100])
    """
    if len(input_shape) != 3:
        raise ValueError(f"ResNet-8 needs input_shape (C, H, W), got {input_shape}")
    return nn.Sequential(
        nn.Conv2d(input_shape[0], width, 3, 1, 1, bias=False),  # (B, w, H, W)
        nn.BatchNorm2d(width),
        nn.ReLU(),
        ResidualBlock(width, width, 1),  # (B, w, H, W)
        ResidualBlock(width, 2 * width, 2),  # (B, 2w, H/2, W/2)
        ResidualBlock(2 * width, 4 * width, 2),  # (B, 4w, H/4, W/4)
        nn.AdaptiveAvgPool2d(1),  # (B, 4w, 1, 1)
        nn.Flatten(),
        nn.Linear(4 * width, num_classes),  # (B, num_classes)
    )
