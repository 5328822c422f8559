"""Reference models: counts against hand computation, forward+backward on every model, MCU fit."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tinyprop import models

# MCU budget (a Cortex-M7-class part, e.g. 1 MiB SRAM and 2 MiB flash, float32 weights):
MAX_PARAMETERS = 256 * 1024  # weights fit 1 MiB of flash
MAX_INFERENCE_BYTES = 256 * 1024  # inference activations fit 256 KiB of SRAM
MAX_TRAINING_BYTES = 1024 * 1024  # training activations (batch 1) fit 1 MiB of SRAM
# models the C runtime must run: only these module types
RUNTIME_MODULES = (
    nn.Sequential, nn.Linear, nn.Conv1d, nn.Conv2d, nn.ReLU, nn.AvgPool1d, nn.AvgPool2d,
    nn.MaxPool1d, nn.MaxPool2d, nn.Flatten,
)  # fmt: skip

ALL_MODELS = [(name, variant) for name in models.names() for variant in models.variants(name)]


def test_summary_matches_hand_count_for_an_mlp():
    net = nn.Sequential(nn.Flatten(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    result = models.summary(net, (2, 3))
    assert result.parameters == 6 * 4 + 4 + 4 * 3 + 3
    assert result.parameter_bytes == 4 * result.parameters
    assert result.macs == 6 * 4 + 4 * 3
    # inference: the largest input+output pair is Flatten's or Linear1's (6 + 6 or 6 + 4)
    assert result.inference_bytes == 4 * 12
    # training: stored x (6, Linear1's input) + ReLU output (4, Linear2's input); largest pair 12
    assert result.training_bytes == 4 * (6 + 4 + 12)
    assert result.training_total_bytes == result.training_bytes + 2 * result.parameter_bytes


def test_summary_matches_hand_count_for_a_cnn_with_depthwise_and_conv1d():
    conv2d = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),  # out 4x5x5, fan_in 18
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, groups=4),  # depthwise: out 4x2x2, fan_in 9
        nn.AvgPool2d(2),  # out 4x1x1
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    result = models.summary(conv2d, (2, 5, 5))
    assert result.parameters == (4 * 18 + 4) + (4 * 9 + 4) + (4 * 3 + 3)
    assert result.macs == 4 * 25 * 18 + 4 * 4 * 9 + 4 * 3
    assert result.inference_bytes == 4 * (100 + 100)  # ReLU's input and output
    # stored: input 50, ReLU output 100, flattened pool output 4 (Linear's input); pair 200
    assert result.training_bytes == 4 * (50 + 100 + 4 + 200)
    conv1d = nn.Sequential(nn.Conv1d(3, 5, 4, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(20, 2))
    result = models.summary(conv1d, (3, 10))  # conv out 5x4, fan_in 12
    assert result.macs == 5 * 4 * 12 + 20 * 2
    assert result.parameters == (5 * 12 + 5) + (20 * 2 + 2)


def test_summary_restores_training_mode_and_counts_the_demo_mlp():
    net = models.build("mnist")
    net.train()
    result = models.summary(net, (1, 28, 28))
    assert net.training
    assert result.macs == 784 * 128 + 128 * 64 + 64 * 10
    assert result.parameters == result.macs + 128 + 64 + 10


@pytest.mark.parametrize(("dataset", "variant"), ALL_MODELS)
def test_reference_model_trains_on_its_input_shape_and_fits_the_mcu(dataset, variant):
    torch.manual_seed(0)
    entry = models.reference(dataset, variant)
    net = models.build(dataset, variant=variant)
    x = torch.randn(2, *entry.input_shape)
    out = net(x)
    if entry.num_classes is None:
        assert out.shape == (2, math.prod(entry.input_shape))
        loss = models.reconstruction_loss(out, x).mean()
    else:
        assert out.shape == (2, entry.num_classes)
        loss = nn.functional.cross_entropy(out, torch.tensor([0, 1]))
    loss.backward()
    for name, parameter in net.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    assert sum(p.grad.abs().sum() for p in net.parameters()) > 0
    size = models.summary(net, entry.input_shape)
    assert size.parameters <= MAX_PARAMETERS, size
    assert size.inference_bytes <= MAX_INFERENCE_BYTES, size
    assert size.training_bytes <= MAX_TRAINING_BYTES, size


@pytest.mark.parametrize("dataset", ["har", "speech_commands"])
def test_runtime_models_use_only_runtime_layers(dataset):
    for module in models.build(dataset).modules():
        assert isinstance(module, RUNTIME_MODULES), type(module)


@pytest.mark.parametrize(
    ("dataset", "num_classes", "input_shape"),
    [
        ("har", 6, (9, 128)),
        ("speech_commands", 12, (1, 98, 40)),
        ("flowers102", 5, (3, 96, 96)),
        ("cifar100", 100, (3, 32, 32)),
        ("mnist", 10, (784,)),
        ("dcase2020", None, (5, 64)),
    ],
)
def test_models_follow_the_given_shapes(dataset, num_classes, input_shape):
    net = models.build(dataset, num_classes=num_classes, input_shape=input_shape)
    out = net(torch.zeros(3, *input_shape))
    expected = math.prod(input_shape) if num_classes is None else num_classes
    assert out.shape == (3, expected)


def test_mnist_cnn_accepts_a_flat_square_image():
    net = models.build("mnist", variant="cnn", input_shape=(784,))
    assert net(torch.zeros(2, 784)).shape == (2, 10)


def test_reconstruction_loss_is_mse_per_sample():
    x = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    reconstruction = torch.tensor([[1.0, 0.0], [3.0, 1.0]])
    assert torch.equal(models.reconstruction_loss(reconstruction, x), torch.tensor([2.0, 5.0]))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: models.build("imagenet"), "no reference model"),
        (lambda: models.build("mnist", variant="transformer"), "no model variant"),
        (lambda: models.build("cifar10", input_shape=(32, 32)), "(C, H, W)"),
        (lambda: models.build("har", input_shape=(6, 10, 10)), "(channels, steps)"),
        (lambda: models.build("mnist", num_classes=1), "at least 2"),
        (lambda: models.build("mnist", variant="cnn", input_shape=(10,)), "square"),
    ],
)
def test_bad_arguments_are_named(call, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call()
