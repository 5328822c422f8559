"""Small models shared by the core tests."""

import torch
from torch import nn


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 5)
    )


def cnn() -> nn.Module:
    """Conv2d, a depthwise Conv2d (stride 2, no bias), pooling, a dilated conv and a Linear head."""
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6, bias=False),
        nn.ReLU(),
        nn.Conv2d(6, 4, 3, padding=2, dilation=2),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, 5),
    )


def conv1d() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(2, 5, 5, stride=2, padding=2),
        nn.ReLU(),
        nn.Conv1d(5, 5, 3, groups=5, padding="same"),
        nn.ReLU(),
        nn.MaxPool1d(2),
        nn.Flatten(),
        nn.Linear(5 * 4, 5),
    )


def resnet() -> nn.Module:
    """The reference ResNet-8 (BatchNorm, residual 1x1 shortcuts), narrow, on 3x16x16."""
    from tinyprop.models.resnet import resnet8

    return resnet8(num_classes=5, input_shape=(3, 16, 16), width=4)


INPUT_SHAPES = {"mlp": (12,), "cnn": (3, 8, 8), "conv1d": (2, 16), "resnet": (3, 16, 16)}
BUILDERS = {"mlp": mlp, "cnn": cnn, "conv1d": conv1d, "resnet": resnet}


def batch(name: str, size: int = 6, seed: int = 0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(size, *INPUT_SHAPES[name], generator=generator, dtype=dtype)
    y = torch.randint(0, 5, (size,), generator=generator)
    return x, y


def build(name: str, seed: int = 0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return BUILDERS[name]().to(dtype)
