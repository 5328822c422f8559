"""Inputs laid out as users hand them (channels-last, strided views, expanded rows) train as
the same values in a contiguous tensor do, and at ratio 1.0 as plain PyTorch does (float32,
the native kernels and PyTorch's)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tinyprop

LOSS = nn.CrossEntropyLoss(reduction="none")


def small_cnn() -> nn.Module:
    """A fan-in-27 convolution (dense kernels), a fan-in-144 one, a depthwise and a 1x1 one."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, groups=32, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 16, 1),
        nn.Tanh(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(64, 5),
    )


def gradients(model: nn.Module, x, y, config=None) -> dict:
    if config is None:
        LOSS(model(x), y).mean().backward()
    else:
        tinyprop.backward(model, LOSS(model(x), y))
    return {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("rows", [2, 8])
@pytest.mark.parametrize("ratio", [1.0, 0.1])
@pytest.mark.parametrize("model_layout", ["contiguous", "channels_last"])
def test_channels_last_inputs_and_models_train_as_contiguous_ones(rows, ratio, model_layout):
    """A few rows' convolution weight gradient (PyTorch's plain kernel, 2 to 8 rows here)
    refused a channels-last input ('slow_conv2d: grad_weight must be contiguous'), and gave a
    channels-last model (``model.to(memory_format=torch.channels_last)``) a wrong weight
    gradient in its first layer (contiguous input: 0.009 off a largest entry of 0.008) and in
    its 1x1 convolution (whose channels-last weight ``is_contiguous()``), silently."""
    plain = small_cnn()
    if model_layout == "channels_last":
        plain = plain.to(memory_format=torch.channels_last)
    config = tinyprop.TinyPropConfig(policy="topk", ratio=ratio)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(rows, 3, 12, 12, generator=generator)
    y = torch.randint(0, 5, (rows,), generator=generator)
    channels_last = x.contiguous(memory_format=torch.channels_last)
    got = gradients(tinyprop.apply(copy.deepcopy(plain), config), channels_last, y, config)
    contiguous = gradients(tinyprop.apply(copy.deepcopy(plain), config), x, y, config)
    expected = gradients(plain, channels_last, y) if ratio == 1.0 else contiguous
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(contiguous[name], value, rtol=1e-5, atol=1e-6, msg=name)
