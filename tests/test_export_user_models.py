"""Models nobody on the team wrote, exported to the C runtime: each one that exports trains in C
as in the Python library (weights within 1e-5 after every step, the same skips and MACs), and
each one that cannot names the layer and what to do.

Covered: models whose forward is written in Python (read as the chain of layers it calls),
the activations ReLU6, LeakyReLU, Sigmoid, Tanh, SiLU, GELU, Hardswish, Hardsigmoid and Mish
(as modules and as functions),
Conv1d stacks (stride, padding, dilation, groups), non-square Conv2d, padding='same',
bias=False, pools with padding and ceil_mode, adaptive pools, Dropout variants at p=0, nested
and named Sequentials, BatchNorm folded before export (:func:`tinyprop.export.fold_batch_norm`).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from test_runtime_parity import batches
from torch import nn

import tinyprop
from tinyprop.export import UnsupportedLayerError, describe, export_c, fold_batch_norm
from tinyprop.export.cli import main as export_main
from tinyprop.export.runtime import OptimizerSpec, RuntimeModel, load_library

Seq = nn.Sequential


@pytest.fixture(scope="module")
def library():
    return load_library()


def with_statistics(model: nn.Module) -> nn.Module:
    """Running statistics and affine weights away from their initial 0 / 1."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            size = module.num_features
            module.running_mean.copy_(torch.rand(size, generator=generator) * 2 - 1)
            module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
            if module.affine:
                module.weight.data.copy_(torch.rand(size, generator=generator) + 0.5)
                module.bias.data.copy_(torch.rand(size, generator=generator) - 0.5)
    return model


def folded(build):
    """A builder of the BatchNorm-folded model of ``build``."""
    return lambda: fold_batch_norm(with_statistics(build()))


class FunctionalNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(6, 8)
        self.second = nn.Linear(8, 3)

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


class MnistStyle(nn.Module):
    """The shape of PyTorch's MNIST example: functional ReLU, pooling and flatten."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.conv2 = nn.Conv2d(4, 8, 3)
        self.fc1 = nn.Linear(8 * 2 * 2, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        x = torch.relu(self.conv2(nn.functional.relu(self.conv1(x))))
        x = nn.functional.max_pool2d(x, 2)
        x = x.view(x.size(0), -1)
        x = nn.functional.dropout(nn.functional.relu(self.fc1(x)), 0.0, training=self.training)
        return self.fc2(x)


class Blocks(nn.Module):
    """User blocks with their own forward, a Sequential inside, a pool and a flatten."""

    class Block(nn.Module):
        def __init__(self, channels):
            super().__init__()
            self.conv = nn.Conv1d(channels, 4, 3)

        def forward(self, x):
            return self.conv(x).relu()

    def __init__(self):
        super().__init__()
        self.first = Blocks.Block(2)
        self.second = nn.Sequential(nn.Conv1d(4, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(4 * 9, 3)

    def forward(self, x):
        x = nn.functional.avg_pool1d(self.second(self.first(x)), 2, stride=1, padding=1)
        return self.head(torch.flatten(x, 1))


class FunctionalActivations(nn.Module):
    """The runtime's other activations called as functions: F.relu6, F.leaky_relu with a
    slope, torch.sigmoid and x.tanh()."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3)
        self.pointwise = nn.Conv1d(4, 4, 1)
        self.hidden = nn.Linear(32, 8)
        self.middle = nn.Linear(8, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = nn.functional.leaky_relu(self.pointwise(nn.functional.relu6(self.conv(x))), 0.2)
        x = torch.sigmoid(self.hidden(x.flatten(1)))
        return self.head(self.middle(x).tanh())


class FunctionalSmoothActivations(nn.Module):
    """SiLU, GELU (both forms), Hardswish, Hardsigmoid and Mish called as functions, as an
    EfficientNet- or MobileNetV3-style forward writes them."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3)
        self.depthwise = nn.Conv1d(4, 4, 3, padding=1, groups=4)
        self.hidden = nn.Linear(32, 8)
        self.middle = nn.Linear(8, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = nn.functional.hardswish(self.conv(x))
        x = nn.functional.silu(self.depthwise(x), inplace=True)
        x = nn.functional.gelu(self.hidden(x.flatten(1)), approximate="tanh")
        x = nn.functional.mish(nn.functional.gelu(self.middle(x)))
        return self.head(nn.functional.hardsigmoid(x))


class FunctionalSettingsActivations(nn.Module):
    """ELU, CELU, SELU and Hardtanh called as functions, their settings given positionally
    and by name, one in place."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3)
        self.pointwise = nn.Conv1d(4, 4, 1)
        self.hidden = nn.Linear(32, 8)
        self.middle = nn.Linear(8, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = nn.functional.hardtanh(self.conv(x), -0.4, max_val=0.6)
        x = nn.functional.elu(self.pointwise(x), 0.3, inplace=True)
        x = torch.selu(self.hidden(x.flatten(1)))
        return self.head(nn.functional.celu(self.middle(x), alpha=0.8))


class GlobalMean(nn.Module):
    """Global average pooling written as a mean, a squeeze after an adaptive pool."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.pointwise = nn.Conv2d(4, 6, 1)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = self.pool(self.conv(x).relu()).contiguous()
        x = self.pointwise(x).mean((2, 3), keepdim=True).squeeze((2, 3))
        return self.head(x)


# name -> (builder, one sample's shape); exported after fold_batch_norm
WITH_BATCH_NORM = {
    "batch_norm_folded_conv_depthwise_no_bias": (
        lambda: Seq(
            nn.Conv2d(2, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
            nn.Conv2d(4, 4, 3, groups=4, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
            nn.Flatten(), nn.Linear(16, 3),
        ),
        (2, 6, 6),
    ),
    "batch_norm_folded_linear_and_conv1d": (
        lambda: Seq(
            Seq(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4, affine=False)), nn.ReLU(),
            nn.Flatten(), nn.Linear(32, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3),
        ),
        (2, 10),
    ),
}  # fmt: skip

# name -> (builder, one sample's shape)
EXPORTED = {
    "conv1d_stride_padding_dilation_groups": (
        lambda: Seq(
            nn.Conv1d(3, 8, 5, stride=2, padding=2), nn.ReLU(),
            nn.Conv1d(8, 8, 3, dilation=2, padding=2), nn.ReLU(),
            nn.Conv1d(8, 6, 3, groups=2, stride=3, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(36, 4),
        ),
        (3, 32),
    ),
    "conv2d_non_square_depthwise_dilated": (
        lambda: Seq(
            nn.Conv2d(2, 4, (3, 5), stride=(1, 2), padding=(1, 2)), nn.ReLU(),
            nn.Conv2d(4, 4, (1, 3), dilation=(1, 2), padding=(0, 2), groups=4), nn.ReLU(),
            nn.Flatten(), nn.Linear(140, 3),
        ),
        (2, 7, 10),
    ),
    "padding_same_2d_and_1d_dilated": (
        lambda: Seq(
            nn.Conv1d(2, 4, 5, padding="same", dilation=2), nn.ReLU(),
            nn.Conv1d(4, 4, 3, padding="same", bias=False), nn.ReLU(),
            nn.Flatten(), nn.Linear(48, 3, bias=False),
        ),
        (2, 12),
    ),
    "pools_padded_overlapping_ceil_adaptive": (
        lambda: Seq(
            nn.Conv2d(1, 4, 3, padding="same"), nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),  # (4, 4, 4)
            nn.AvgPool2d(2, stride=1, padding=1),  # (4, 5, 5)
            nn.Conv2d(4, 4, 2), nn.ReLU(),  # (4, 4, 4)
            nn.MaxPool2d(2, ceil_mode=True),  # ceil_mode changes nothing here: (4, 2, 2)
            nn.AdaptiveAvgPool2d((None, 1)),  # (4, 2, 1)
            nn.Flatten(), nn.Linear(8, 3),
        ),
        (1, 7, 7),
    ),
    "adaptive_max_and_dropouts_at_zero": (
        lambda: Seq(
            nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Dropout1d(0.0),
            nn.AdaptiveMaxPool1d(2), nn.Flatten(), nn.Dropout(0.0), nn.Linear(8, 3),
        ),
        (2, 10),
    ),
    "nested_named_sequentials_and_flatten_placements": (
        lambda: Seq(
            OrderedDict(
                features=Seq(Seq(nn.Conv2d(1, 4, 3), nn.ReLU()), nn.Identity()),
                head=Seq(nn.Flatten(), nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Flatten()),
                out=nn.Linear(8, 3),
            )
        ),
        (1, 6, 6),
    ),
    **{name: (folded(build), shape) for name, (build, shape) in WITH_BATCH_NORM.items()},
    "forward_with_functional_calls": (FunctionalNet, (6,)),
    "mnist_style_forward": (MnistStyle, (1, 8, 8)),
    "user_blocks_with_their_own_forward": (Blocks, (2, 10)),
    "mean_squeeze_contiguous_forward": (GlobalMean, (1, 6, 6)),
    "relu6_leaky_sigmoid_tanh_modules": (
        lambda: Seq(
            nn.Conv2d(2, 4, 3, padding=1), nn.ReLU6(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(4, 4, 3, groups=4, padding=1), nn.LeakyReLU(), nn.Flatten(),
            nn.Linear(36, 8), nn.Sigmoid(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3),
        ),
        (2, 6, 6),
    ),
    "activations_as_functions": (FunctionalActivations, (2, 10)),
    "mobilenet_v3_style_block": (  # the activations whose derivative needs their input
        lambda: Seq(
            nn.Conv2d(2, 8, 3, stride=2, padding=1), nn.Hardswish(inplace=True),
            nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.SiLU(inplace=True), nn.ReLU(),
            nn.Conv2d(8, 6, 1), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(6, 8), nn.Mish(), nn.Tanh(), nn.Linear(8, 8), nn.Hardsigmoid(),
            nn.Dropout(0.0), nn.Linear(8, 3),
        ),
        (2, 8, 8),
    ),
    "smooth_activations_as_functions": (FunctionalSmoothActivations, (2, 10)),
    "settings_activations": (  # in place, their derivative from their output
        lambda: Seq(
            nn.Conv1d(2, 6, 3, padding=1), nn.ELU(inplace=True), nn.Conv1d(6, 6, 3, groups=6),
            nn.Hardtanh(-0.3, 0.3), nn.AvgPool1d(2), nn.Flatten(), nn.Linear(24, 8),
            nn.SELU(inplace=True), nn.Linear(8, 8), nn.CELU(1.3), nn.Linear(8, 3),
        ),
        (2, 10),
    ),
    "settings_activations_as_functions": (FunctionalSettingsActivations, (2, 10)),
}  # fmt: skip


def run_parity(library, build, shape, config, optimizer, steps=4):
    """Train the model in C and in the library side by side; compare after every step."""
    torch.manual_seed(0)
    reference = build()
    c_model = RuntimeModel(reference, shape, config, optimizer, library)
    x = torch.randn(1, *shape)
    with torch.no_grad():
        expected = reference.eval()(x)[0].numpy()
    np.testing.assert_allclose(c_model.predict(x.numpy()), expected, rtol=1e-5, atol=1e-6)
    python_model = tinyprop.apply(copy.deepcopy(reference).train(), config)
    if optimizer.kind == "adam":
        python_optimizer = torch.optim.Adam(python_model.parameters(), lr=optimizer.lr)
    else:
        python_optimizer = torch.optim.SGD(
            python_model.parameters(), lr=optimizer.lr, momentum=optimizer.momentum
        )
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    trained = skipped = 0
    for step, (x, y) in enumerate(batches(shape, c_model.layers[-1].output_size, steps, 8, 0)):
        python_stats = tinyprop.train_step(python_model, x, y, loss_fn, python_optimizer)
        c_stats = c_model.train_batch(x.numpy(), y.numpy())
        assert c_stats.trained_mask.tolist() == python_stats.trained_mask.tolist(), step
        assert c_stats.macs == python_stats.macs, step
        state = python_model.state_dict()
        for name, value in c_model.parameters().items():
            python_value = state[name].numpy().reshape(-1)
            scale = float(np.abs(python_value).max())
            np.testing.assert_allclose(
                value, python_value, rtol=1e-5, atol=1e-5 * scale, err_msg=f"step {step} {name}"
            )
        trained += c_stats.trained
        skipped += c_stats.skipped
    return trained, skipped


@pytest.mark.parametrize("name", list(EXPORTED))
def test_user_models_train_in_c_as_in_the_library(library, name):
    build, shape = EXPORTED[name]
    config = tinyprop.TinyPropConfig(policy="tinypropv2", skip_threshold=0.9)
    trained, skipped = run_parity(
        library, build, shape, config, OptimizerSpec(lr=0.05, momentum=0.9)
    )
    assert trained > 0 and skipped > 0, (trained, skipped)


@pytest.mark.parametrize("policy", ["full", "topk", "tinyprop"])
def test_user_model_under_adam_and_every_policy(library, policy):
    build, shape = EXPORTED["pools_padded_overlapping_ceil_adaptive"]
    config = tinyprop.TinyPropConfig(policy=policy)
    run_parity(library, build, shape, config, OptimizerSpec("adam", lr=0.01), steps=3)


def test_folding_keeps_the_eval_output_and_leaves_the_model_alone():
    for build, shape in WITH_BATCH_NORM.values():
        torch.manual_seed(0)
        model = with_statistics(build())
        before = copy.deepcopy(model.state_dict())
        result = fold_batch_norm(model)
        x = torch.randn(5, *shape)
        with torch.no_grad():
            torch.testing.assert_close(result(x), model.eval()(x), rtol=1e-5, atol=1e-6)
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in result.modules())
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, before[key], rtol=0, atol=0)


# (model, one sample's shape, what the message must say)
REFUSED = [
    (Seq(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 3)), (1, 6, 6),
     r"layer '1' \(BatchNorm2d\).*fold_batch_norm"),
    (Seq(nn.Linear(6, 8), nn.PReLU(), nn.Linear(8, 3)), (6,),
     r"'1' \(PReLU\).*weight.*trains.*nn\.LeakyReLU\(negative_slope=float\(prelu\.weight\)\)"),
    (Seq(nn.Linear(6, 8), nn.Softsign(), nn.Linear(8, 3)), (6,), r"'1' \(Softsign\).*fine-tune"),
    (Seq(nn.Linear(6, 8), nn.LeakyReLU(-0.1), nn.Linear(8, 3)), (6,),
     r"'1' \(LeakyReLU\): negative_slope=-0\.1.*slope >= 0"),
    (Seq(nn.Linear(6, 8), nn.Softplus(), nn.Linear(8, 3)), (6,),
     r"'1' \(Softplus\).*Hardsigmoid and Mish"),
    (Seq(nn.Linear(6, 8), nn.ELU(-0.5), nn.Linear(8, 3)), (6,),
     r"'1' \(ELU\): alpha=-0\.5.*derivative from the output.*>= 0"),
    (Seq(nn.Linear(6, 8), nn.ELU(float("inf")), nn.Linear(8, 3)), (6,),
     r"'1' \(ELU\): alpha=inf is not finite"),
    (Seq(nn.Linear(6, 8), nn.Hardtanh(-1, 1), nn.ELU(), nn.Linear(8, 3)), (6,),
     r"'2' \(ELU\): it follows the activation '1' \(Hardtanh\)"),
    (Seq(nn.Linear(6, 8), nn.Tanhshrink(), nn.Linear(8, 3)), (6,), r"'1' \(Tanhshrink\)"),
    (Seq(nn.Linear(6, 8), nn.ReLU(), nn.Sigmoid(), nn.Linear(8, 3)), (6,),
     r"'2' \(Sigmoid\): it follows the activation '1' \(ReLU\).*in place"),
    (Seq(nn.Conv1d(2, 4, 3), nn.Tanh(), nn.Flatten(), nn.Tanh(), nn.Linear(32, 3)), (2, 10),
     r"'3' \(Tanh\): it follows the activation '1' \(Tanh\)"),
    (Seq(nn.Linear(6, 3), nn.Softmax(dim=1)), (6,), r"'1' \(Softmax\).*logits"),
    (Seq(nn.Linear(6, 8), nn.Dropout(0.5), nn.Linear(8, 3)), (6,),
     r"'1' \(Dropout\).*nn\.Identity"),
    (Seq(nn.Conv2d(1, 2, 3), nn.Dropout2d(0.2), nn.Flatten(), nn.Linear(32, 3)), (1, 6, 6),
     r"'1' \(Dropout2d\): p=0\.2"),
    (Seq(nn.Conv2d(1, 4, 4, padding="same"), nn.Flatten(), nn.Linear(144, 3)), (1, 6, 6),
     r"'0' \(Conv2d\): padding='same'.*odd kernel"),
    (Seq(nn.Conv2d(1, 4, 3), nn.MaxPool2d(2, ceil_mode=True), nn.Flatten(), nn.Linear(36, 3)),
     (1, 7, 7), r"'1' \(MaxPool2d\): ceil_mode=True"),
    (Seq(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(3), nn.Flatten(), nn.Linear(36, 3)), (1, 6, 6),
     r"'1' \(AdaptiveAvgPool2d\): output_size=3.*multiple"),
    (Seq(nn.Conv2d(1, 4, 3), nn.AvgPool2d(3, padding=1, count_include_pad=False), nn.Flatten(),
         nn.Linear(16, 3)), (1, 6, 6), r"'1' \(AvgPool2d\): count_include_pad=False"),
    (nn.ModuleList([nn.Linear(6, 3)]), (6,), r"'<root>' \(ModuleList\).*nn\.Sequential"),
    (Seq(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3)), (6,), r"'1' \(LayerNorm\)"),
]  # fmt: skip


@pytest.mark.parametrize(("model", "shape", "message"), REFUSED)
def test_what_cannot_be_exported_is_named_with_what_to_do(model, shape, message):
    with pytest.raises(UnsupportedLayerError, match=message):
        describe(model, shape)


def test_pool_padding_pytorch_refuses_is_refused():
    model = Seq(nn.Conv2d(1, 4, 3), nn.MaxPool2d(2, padding=2), nn.Flatten(), nn.Linear(64, 3))
    with pytest.raises(ValueError, match="more than half the kernel"):
        describe(model, (1, 6, 6))


def negative_variance() -> nn.Module:
    model = Seq(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    model[1].running_var.fill_(-1.0)
    return model


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (Seq(nn.BatchNorm2d(1), nn.Conv2d(1, 4, 3)), r"'0' \(BatchNorm2d\).*right after a Conv2d"),
        (negative_variance(), r"'1' \(BatchNorm2d\).*NaN or infinite.*running_var"),
        (Seq(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)), r"'2' .*right after"),
        (Seq(nn.Linear(6, 4), nn.BatchNorm1d(4, track_running_stats=False)), "running stat"),
        (Seq(nn.Conv1d(1, 4, 3), nn.BatchNorm2d(4)), r"right after a Conv2d"),
    ],
)
def test_batch_norm_that_cannot_be_folded_is_named(model, message):
    with pytest.raises(ValueError, match=message):
        fold_batch_norm(model)


def test_cli_folds_batch_norm_on_request(tmp_path, capsys):
    torch.manual_seed(0)
    model = with_statistics(
        Seq(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
    )
    path = tmp_path / "bn.pt"
    torch.save(model, path)
    arguments = [str(path), "--input-shape", "1,6,6", "--out", str(tmp_path / "c")]
    assert export_main(arguments) == 2
    assert "--fold-batch-norm" in capsys.readouterr().err
    assert export_main([*arguments, "--fold-batch-norm"]) == 0
    header = (tmp_path / "c" / "tinyprop_model.h").read_text()
    assert header.count("TP_LAYER_CONV2D") == 1 and "BatchNorm" not in header.split("*/", 1)[1]


@pytest.mark.parametrize("shape", ["1,,10", "2,10,", " 2x10 "])
def test_cli_input_shape_with_an_empty_part_is_refused(tmp_path, capsys, shape):
    """An --input-shape of 1,,10 was read as (1, 10); a trailing comma and spaces are fine."""
    path = tmp_path / "conv.pt"
    torch.save(Seq(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3)), path)
    arguments = [str(path), "--input-shape", shape, "--out", str(tmp_path / "c")]
    if shape == "1,,10":
        with pytest.raises(SystemExit):
            export_main(arguments)
        assert "--input-shape must look like 1,28,28" in capsys.readouterr().err
    else:
        assert export_main(arguments) == 0


class Forward(nn.Module):
    """A forward written in Python around two Linear layers: ``body(self, x)``."""

    def __init__(self, body):
        super().__init__()
        self.first = nn.Linear(6, 6)
        self.last = nn.Linear(6, 3)
        self.body = body

    def forward(self, x):
        return self.body(self, x)


def in_place(self, x):
    x = self.first(x)
    x.relu_()
    return x


def branch(self, x):
    if x.sum() > 0:
        x = self.first(x)
    return self.last(x)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (lambda self, x: self.last(x + self.first(x)), "residual sum or a branch"),
        (lambda self, x: self.last(nn.functional.softplus(self.first(x))), "'softplus'.*no C "),
        (
            lambda self, x: self.last(nn.functional.hardtanh(self.first(x), 1.0, -1.0)),
            "min_val",
        ),
        (lambda self, x: self.last(self.first(self.first(x))), "calls 'first' more than once"),
        (lambda self, x: self.last(nn.functional.linear(x, self.first.weight)), "first.weight"),
        (lambda self, x: (self.last(self.first(x)), x), "residual sum or a branch"),
        (lambda self, x: self.last(self.first(x).view(-1, 2, 3).flatten(1)), "not a flat"),
        (lambda self, x: self.last(self.first(x)).log_softmax(1), "log_softmax"),
        (branch, "cannot be traced by torch.fx"),
        (lambda self, x: self.last(self.first(x[:, :4])), "fails on a batch"),
        (lambda self, x: self.last(self.first(x) * 2.0), "constant.*fold"),
        (
            lambda self, x: self.last(nn.functional.dropout(self.first(x), 0.3, training=False)),
            r"\(Dropout\): p=0\.3",
        ),
        (
            lambda self, x: self.last(self.first(x).mean(1, keepdim=True).expand(-1, 6)),
            "averages over dimensions",
        ),
        (lambda self, x: self.last(in_place(self, x)), r"in place.*x = x\.relu\(\)"),
    ],
)
def test_a_forward_that_is_not_a_chain_of_runtime_layers_is_named(body, message):
    with pytest.raises(UnsupportedLayerError, match=message):
        describe(Forward(body), (6,))


def test_a_layer_name_torch_fx_cannot_write_is_a_clear_error():
    """A submodule named with a newline: torch.fx's generated code was a SyntaxError traceback."""
    model = Forward(lambda self, x: self.last(getattr(self, "odd\nname")(x)))
    model.add_module("odd\nname", nn.Linear(6, 6))
    with pytest.raises(UnsupportedLayerError, match="cannot be traced by torch.fx"):
        describe(model, (6,))


def test_a_model_deeper_than_the_runtime_holds_names_the_limit(library):
    """49 runtime layers against TP_MAX_LAYERS = 48: the error gives both counts and the flag
    (it was the C status 'a setting or count is out of range')."""
    layers = [nn.Linear(4, 4) if i % 2 == 0 else nn.ReLU() for i in range(48)] + [nn.Linear(4, 2)]
    model = nn.Sequential(*layers)
    assert len(describe(model, (4,))) == 49
    config = tinyprop.TinyPropConfig(policy="full")
    with pytest.raises(ValueError, match=r"49 runtime layers.*at most 48.*-DTP_MAX_LAYERS=49"):
        RuntimeModel(model, (4,), config, OptimizerSpec(lr=0.05), library)
    shallower = nn.Sequential(*layers[:47])
    assert RuntimeModel(shallower, (4,), config, OptimizerSpec(lr=0.05), library).arena_bytes > 0


def fine_tune_head() -> nn.Sequential:
    """A conv net to fine-tune with an optimizer over some of its layers, every parameter
    keeping requires_grad (the usual way to fine-tune a head)."""
    torch.manual_seed(0)
    return Seq(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(32, 8), nn.ReLU(),
               nn.Linear(8, 3))  # fmt: skip


@pytest.mark.parametrize("optimizer_kind", ["sgd", "adam"])
def test_parameters_the_torch_optimizer_leaves_out_stay_fixed_in_c(library, optimizer_kind):
    """OptimizerSpec.from_torch of an optimizer over the head only: the C program trained every
    layer (the conv's weights moved by up to 0.0094 with SGD, 0.030 with Adam, in 3 steps
    of 8 samples, where PyTorch keeps them); now the
    layers it leaves out are frozen as PyTorch leaves them, weights equal within 1e-5."""
    net = fine_tune_head()
    python_model = tinyprop.apply(copy.deepcopy(net), tinyprop.TinyPropConfig("topk"))

    def optimizer_of(model):
        head = [*model[3].parameters(), *model[5].parameters()]
        if optimizer_kind == "adam":
            return torch.optim.Adam(head, lr=0.01)
        return torch.optim.SGD(head, lr=0.05, momentum=0.9)

    spec = OptimizerSpec.from_torch(optimizer_of(net))
    c_model = RuntimeModel(net, (2, 10), tinyprop.TinyPropConfig("topk"), spec, library)
    python_optimizer = optimizer_of(python_model)
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    for x, y in batches((2, 10), 3, 3, 8, 0):
        tinyprop.train_step(python_model, x, y, loss_fn, python_optimizer)
        c_model.train_batch(x.numpy(), y.numpy())
    state = python_model.state_dict()
    np.testing.assert_array_equal(state["0.weight"].numpy(), net[0].weight.detach().numpy())
    for name, value in c_model.parameters().items():
        expected = state[name].numpy().reshape(-1)
        np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6, err_msg=name)
    assert c_model.memory_mode.first_trained_layer == 1


def test_an_optimizer_that_leaves_out_a_middle_layer_is_refused(library, tmp_path):
    """The runtime freezes only the first layers: a middle layer outside the optimizer is named
    (it was trained in C, silently)."""
    from tinyprop.export import export_c

    net = fine_tune_head()
    spec = OptimizerSpec.from_torch(torch.optim.SGD([*net[0].parameters(), *net[5].parameters()]))
    config = tinyprop.TinyPropConfig("topk")
    with pytest.raises(ValueError, match=r"layer '3' \(Linear.*optimizer leaves it out"):
        export_c(net, config, tmp_path / "out", (2, 10), spec)
    with pytest.raises(ValueError, match=r"layer '3' \(Linear.*optimizer leaves it out"):
        RuntimeModel(net, (2, 10), config, spec, library)
    assert not (tmp_path / "out").exists()


class ForwardWithBatchNorm(nn.Module):
    """The usual hand-written CNN: conv, BatchNorm, F.relu, pooling, BatchNorm1d in the head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, bias=False)
        self.norm = nn.BatchNorm2d(4)
        self.hidden = nn.Linear(16, 8)
        self.hidden_norm = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = nn.functional.max_pool2d(nn.functional.relu(self.norm(self.conv(x))), 2)
        return self.head(torch.relu(self.hidden_norm(self.hidden(x.flatten(1)))))


def test_batch_norm_in_a_forward_written_in_python_is_folded(library):
    """fold_batch_norm walked nn.Sequential leaves only: on a model whose forward calls its
    layers it returned the model unfolded, and the export's refusal of the BatchNorm told the
    user to fold it. Now it reads the chain the forward calls (input_shape given, or inferred
    for an MLP): the same eval output, and training in C as in the library."""
    model = with_statistics(ForwardWithBatchNorm())
    folded = fold_batch_norm(model, (1, 6, 6))
    assert isinstance(folded.norm, nn.Identity) and isinstance(folded.hidden_norm, nn.Identity)
    assert isinstance(model.norm, nn.BatchNorm2d)  # the model itself is left as it was
    x = torch.randn(5, 1, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(folded.eval()(x), model.eval()(x), rtol=1e-5, atol=1e-6)
    config = tinyprop.TinyPropConfig(policy="tinypropv2", skip_threshold=0.9)
    run_parity(library, lambda: copy.deepcopy(folded), (1, 6, 6), config, OptimizerSpec(lr=0.05))
    with pytest.raises(ValueError, match="pass input_shape"):
        fold_batch_norm(model)  # a convolutional model: its input shape cannot be inferred


@pytest.mark.parametrize("policy", ["full", "topk", "tinyprop", "tinypropv2"])
def test_a_model_trained_under_each_policy_exports_as_the_plain_one_with_its_weights(
    library, tmp_path, policy
):
    """A model applied with tinyprop and trained in Python (3 steps) exports exactly what the
    plain model with the same weights exports: the same files, byte for byte (before, the
    header named the sparse layers TinyPropConv2d and TinyPropLinear, and a ReLU before a
    sparse layer ConvInputReLU), and refusals name PyTorch's layers too. The export carries the
    weights alone: in C, training goes on as in a model applied afresh with those weights
    (running maxima from 0, a fresh optimizer), weights within 1e-5, the same skips."""
    torch.manual_seed(0)
    net = Seq(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(36, 12),
              nn.ReLU(), nn.Linear(12, 3))  # fmt: skip
    shape, config = (1, 8, 8), tinyprop.TinyPropConfig(policy)
    applied = tinyprop.apply(copy.deepcopy(net), config)
    optimizer = torch.optim.SGD(applied.parameters(), lr=0.1, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    for x, y in batches(shape, 3, 3, 8, 1):
        tinyprop.train_step(applied, x, y, loss_fn, optimizer)
    plain = tinyprop.remove(copy.deepcopy(applied))
    assert not torch.equal(plain[0].weight, net[0].weight)  # it trained
    spec = OptimizerSpec("sgd", 0.1, 0.9)
    written = {}
    for name, model in (("applied", applied), ("plain", plain)):
        result = export_c(model, config, tmp_path / name, shape, spec, 8)
        written[name] = {p.relative_to(result.out_dir): p.read_bytes() for p in result.files}
    assert written["applied"] == written["plain"]
    header = written["applied"][Path("tinyprop_model.h")].decode()
    assert "TinyProp" not in header.replace("TinyPropv2", "") and "ConvInput" not in header
    with pytest.raises(UnsupportedLayerError, match=r"'3' \(Linear\): a Linear on a 3-D"):
        describe(Seq(*list(applied)[:3], *list(applied)[4:]), shape)
    c_model = RuntimeModel(applied, shape, config, spec, library)
    fresh = tinyprop.apply(copy.deepcopy(plain), config)
    fresh_optimizer = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    for step, (x, y) in enumerate(batches(shape, 3, 3, 8, 2)):
        python_stats = tinyprop.train_step(fresh, x, y, loss_fn, fresh_optimizer)
        c_stats = c_model.train_batch(x.numpy(), y.numpy())
        assert c_stats.trained_mask.tolist() == python_stats.trained_mask.tolist(), step
        state = fresh.state_dict()
        for name, value in c_model.parameters().items():
            expected = state[name].numpy().reshape(-1)
            scale = float(np.abs(expected).max())
            np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-5 * scale, err_msg=name)
