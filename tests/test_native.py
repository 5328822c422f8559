"""The native kernels (tinyprop.native) against the PyTorch kernels they replace."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from core_models import BUILDERS, batch, build
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import tinyprop
import tinyprop.autograd
from tinyprop import native
from tinyprop.functional import keep_count, select_topk, select_topk_torch

LOSS = nn.CrossEntropyLoss(reduction="none")

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler")


@st.composite
def scores_and_keep(draw):
    """Scores of every kind select_topk meets: continuous, many ties, mostly zeros, tiny."""
    rows, size = draw(st.integers(1, 5)), draw(st.integers(1, 3000))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    kind = draw(st.sampled_from(["uniform", "ties", "zeros", "denormal"]))
    scores = torch.rand(rows, size, generator=generator)
    if kind == "ties":
        scores = torch.randint(0, 4, (rows, size), generator=generator).float()
    elif kind == "zeros":
        scores[scores < 0.8] = 0
    elif kind == "denormal":
        scores = scores * 1e-40
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    most = draw(st.sampled_from([size, max(1, size // 8)]))  # small k: the sampled bound
    keep = torch.randint(1, most + 1, (rows,), generator=generator)
    return scores.to(dtype), keep


@settings(max_examples=300, deadline=None)
@given(scores_and_keep())
def test_native_selection_equals_pytorch_selection(case):
    scores, keep = case
    rows, columns = select_topk(scores, keep)
    expected_rows, expected_columns = select_topk_torch(scores, keep)
    assert torch.equal(rows, expected_rows)
    assert torch.equal(columns, expected_columns)


@settings(max_examples=100, deadline=None)
@given(scores_and_keep(), st.booleans())
def test_native_topk_of_signed_delta_keeps_largest_magnitudes(case, negate):
    scores, keep = case
    sign = torch.where(torch.rand(scores.shape) < 0.5, -1.0, 1.0).to(scores.dtype)
    delta = scores * sign * (-1 if negate else 1)  # (B, N) signed, |δ| = scores
    rows, columns, values = native.topk(delta, keep)
    expected_rows, expected_columns = select_topk_torch(scores, keep)
    assert torch.equal(rows, expected_rows)
    assert torch.equal(columns, expected_columns)
    assert torch.equal(values, delta[rows, expected_columns])
    masked = native.topk(delta, keep, masked=True)
    expected = torch.zeros_like(delta)
    expected[rows, expected_columns] = delta[rows, expected_columns]
    assert torch.equal(masked, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("keep_share", [0.01, 0.05, 0.1, 0.3])
def test_native_selection_of_pooled_delta_equals_pytorch_selection(dtype, keep_share):
    """δ of a conv layer behind ReLU and 2x2 max pooling: three entries of every window and
    the inactive ReLUs are exact zeros, in a pattern that repeats every image row (the row
    sample of the selection must not follow it); some rows keep more than their non-zeros."""
    generator = torch.Generator().manual_seed(13)
    pooled = torch.randn(6, 16, 14, 14, generator=generator)  # (B, C, H/2, W/2)
    pooled[torch.rand(pooled.shape, generator=generator) < 0.5] = 0  # inactive ReLUs
    mask = nn.functional.max_pool2d(torch.rand(6, 16, 28, 28, generator=generator), 2, 2, 0, 1,
                                    False, True)[1]  # fmt: skip
    delta = nn.functional.max_unpool2d(pooled, mask, 2).reshape(6, -1).to(dtype)  # (B, N)
    delta[5, 40:] = 0  # a row with fewer non-zero entries than k
    keep = torch.full((6,), max(1, round(keep_share * delta.shape[1])))
    rows, columns, values = native.topk(delta, keep)
    expected_rows, expected_columns = select_topk_torch(delta.abs(), keep)
    assert torch.equal(rows, expected_rows)
    assert torch.equal(columns, expected_columns)
    assert torch.equal(values, delta[rows, columns])


def test_native_selection_rejects_bad_keep():
    with pytest.raises(ValueError, match="keep counts must be in"):
        native.topk(torch.rand(2, 5), torch.tensor([0, 3]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("size", [16, 100_000])  # every entry a candidate / the sampled bound
@pytest.mark.parametrize("masked", [False, True])
def test_native_topk_on_nan_or_inf_raises_naming_the_row(dtype, bad, size, masked):
    """A row of δ holding NaN or ±Inf has no k largest entries: the kernel reports the row
    (it used to write past its buffers on NaN: "double free or corruption")."""
    delta = torch.rand(4, size, dtype=dtype) * (torch.rand(4, size) < 0.1)  # mostly zeros
    delta[2, size // 3] = bad
    delta[3, 0] = bad
    with pytest.raises(FloatingPointError, match="row 2 of the output gradient δ"):
        native.topk(delta, torch.full((4,), max(1, size // 50)), masked=masked)


def test_select_topk_on_a_nan_column_raises_instead_of_corrupting_memory():
    """The reproduction from the report: NaN in column 0 of zero rows, keep 1."""
    scores = torch.zeros(4, 16)
    scores[:, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="row 0 .* 1 NaN or infinite"):
        select_topk(scores, torch.ones(4, dtype=torch.long))


def test_native_topk_keeps_exactly_k_of_denormals_and_finite_extremes():
    big = torch.finfo(torch.float32).max
    delta = torch.tensor([[1e-45, -1e-45, 0.0, big, -big, 1e-40, 3e-41, 0.0]] * 3)
    for k in range(1, 9):
        keep = torch.full((3,), k)
        rows, columns, values = native.topk(delta, keep)
        assert torch.equal(columns, select_topk_torch(delta.abs(), keep)[1])
        assert torch.equal(values, delta[rows, columns])


def test_native_topk_rejects_mismatched_shapes_and_bad_keep_before_writing():
    with pytest.raises(ValueError, match="keep \\(B,\\)"):
        native.topk(torch.rand(3, 5), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="keep counts must be in"):
        native.topk(torch.rand(2, 5), torch.tensor([5, -5]))  # Σ keep = 0: nothing written


def test_native_backward_kernels_pass_nan_through_and_check_their_entries():
    """NaN and ±Inf in x, weight or the kept δ only flow into the gradients they touch (the
    training step's own check reports them); malformed kept entries are a ValueError."""
    x, weight = torch.randn(3, 4), torch.randn(5, 4)
    x[1, 2] = float("nan")
    row_start, column = torch.tensor([0, 1, 1, 3]), torch.tensor([0, 2, 4])
    value = torch.tensor([1.0, float("inf"), 0.5])
    grad_input, grad_weight = native.linear_backward(
        x, weight, row_start, column, value, True, True
    )
    assert torch.isfinite(grad_input[0]).all() and (grad_input[1] == 0).all()
    assert not torch.isfinite(grad_input[2]).all()
    assert torch.isfinite(grad_weight[[0, 1, 3]]).all() and not torch.isfinite(grad_weight[2]).all()
    with pytest.raises(ValueError, match="kept entries must be"):
        native.linear_backward(x, weight, row_start[:3], column, value, True, True)
    with pytest.raises(ValueError, match="kept entries must be"):
        native.linear_backward(x, weight, row_start, column[:2], value[:2], True, True)
    with pytest.raises(ValueError, match="kept output indices"):
        native.linear_backward(x, weight, row_start, column + 3, value, True, True)
    for unordered in ([0, 4, 2], [0, 2, 2]):  # a sample's indices must ascend (its sum order)
        with pytest.raises(ValueError, match="ascending within each sample"):
            native.linear_backward(x, weight, row_start, torch.tensor(unordered), value, True, True)
        with pytest.raises(ValueError, match="ascending within each sample"):
            native.linear_update(x, weight.clone(), row_start, torch.tensor(unordered), value, -0.1)
    images, kernels = torch.randn(1, 4, 4, 2), torch.randn(3, 3, 3, 2)
    images[0, 1, 1, 0] = float("nan")
    shape = (1, 4, 4, 2, 3, 3, 3, 2, 2, 1, 1, 1, 1, 1)
    grad_input, grad_weight = native.conv_backward(
        images, kernels, shape, torch.tensor([0, 1]), torch.tensor([5]), torch.ones(1),
        True, True,
    )  # fmt: skip
    assert grad_weight.isnan().any() and torch.isfinite(grad_input).all()
    with pytest.raises(ValueError, match="does not fit"):
        native.conv_backward(
            images, kernels, (1, 4, 4, 2, 3, 3, 3, 3, 3, 1, 1, 1, 1, 1),
            torch.tensor([0, 1]), torch.tensor([5]), torch.ones(1), True, True,
        )  # fmt: skip


@pytest.mark.parametrize(
    "outputs, inputs",
    [(9, 7), (300, 150), (1100, 1000)],
    ids=["tiny", "three-row-blocks-and-a-partial-tile", "streamed-grad-weight"],
)
def test_native_linear_backward_equals_products_of_kept_entries(outputs, inputs):
    """The kernel tiles the inputs by 64 and the outputs by 128 (its grad_input sums run over
    blocks) and streams large weight gradients past the caches: every shape gives the dense
    products of the kept entries."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(6, inputs, generator=generator)
    weight = torch.randn(outputs, inputs, generator=generator)
    delta = torch.randn(6, outputs, generator=generator)
    keep = torch.tensor([2, 0, outputs, 1, 0, 4])  # samples 1 and 4 skipped: no entries
    mask = torch.zeros(6, outputs)
    for sample, count in enumerate(keep.tolist()):
        mask[sample, torch.randperm(outputs, generator=generator)[:count]] = 1
    rows, columns = mask.nonzero(as_tuple=True)
    row_start = torch.cat([torch.zeros(1, dtype=torch.long), keep.cumsum(0)])
    grad_input, grad_weight = native.linear_backward(
        x, weight, row_start, columns, delta[rows, columns], True, True
    )
    masked = delta * mask
    torch.testing.assert_close(grad_weight, masked.t() @ x, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad_input, masked @ weight, rtol=1e-4, atol=1e-4)
    assert grad_input[1].abs().sum() == 0 and grad_input[4].abs().sum() == 0


@pytest.mark.parametrize("pads", [(0, 0, 0, 0), (1, 1, 1, 1), (0, 2, 1, 0)])
@pytest.mark.parametrize("size", [(3, 5, 4, 7), (2, 19, 7, 7), (2, 16, 3, 4)])
def test_native_channels_last_copy_equals_pad_then_permute(pads, size):
    """The convolution kernel's input and its gradient's way back: exactly F.pad and a
    channels-last copy, and the cropped channels-first copy (with 8 or more channels, blocks
    of 8 channels x 8 positions, some across image rows, and what is left)."""
    generator = torch.Generator().manual_seed(sum(pads))
    x = torch.randn(*size, generator=generator)
    top, bottom, left, right = pads
    expected = nn.functional.pad(x, (left, right, top, bottom)).permute(0, 2, 3, 1)
    padded = native.channels_last(x, pads)
    assert torch.equal(padded, expected)
    assert torch.equal(native.channels_first(padded, pads), x)


@pytest.mark.parametrize("pads", [(0, 0, 0, 0), (1, 1, 1, 1), (2, 0, 1, 3)])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("channels", [4, 16])
def test_native_conv_input_gradient_channels_first_equals_the_padded_one_cropped(
    pads, groups, channels
):
    """conv_backward(pads=...) writes the input gradient as PyTorch holds it (channels first,
    the padding cropped): bit for bit the padded channels-last gradient after channels_first."""
    generator = torch.Generator().manual_seed(sum(pads) + groups)
    images = torch.randn(3, 11, 10, channels, generator=generator)  # (B, Hp, Wp, C_in)
    kernels = torch.randn(6, 3, 3, channels // groups, generator=generator)  # (C_out, kh, kw, Cg)
    shape = (3, 11, 10, channels, 6, 3, 3, 9, 8, 1, 1, 1, 1, groups)
    delta = torch.randn(3, 6 * 72, generator=generator)
    delta[1] = 0  # a sample that keeps nothing
    rows, column = (delta != 0).nonzero(as_tuple=True)
    keep = torch.bincount(rows, minlength=3)
    row_start = torch.cat([torch.zeros(1, dtype=torch.long), keep.cumsum(0)])
    value = delta[rows, column]
    padded, weight_padded = native.conv_backward(
        images, kernels, shape, row_start, column, value, True, True
    )
    planes, weight_planes = native.conv_backward(
        images, kernels, shape, row_start, column, value, True, True, pads=pads
    )
    assert torch.equal(planes, native.channels_first(padded, pads))
    assert torch.equal(weight_planes, weight_padded)
    _, no_weight = native.conv_backward(
        images, kernels, shape, row_start, column, value, True, False, pads=pads
    )
    assert no_weight is None
    with pytest.raises(ValueError, match="pads"):
        native.conv_backward(
            images, kernels, shape, row_start, column, value, True, True, pads=(6, 5, 0, 0)
        )


@pytest.mark.parametrize(
    "shape",
    [
        (3, 4, 9, 7, 4, 3, 1, 1, 1),  # (B, C_in, H, W, C_out, k, stride, padding, dilation)
        (3, 4, 9, 7, 8, 3, 2, 1, 1),  # two output channels per input channel
        (2, 6, 12, 12, 6, 3, 2, 2, 2),
        (2, 6, 5, 5, 6, 5, 1, 0, 1),
        (2, 5, 1, 11, 5, 3, 1, 1, 1),  # a Conv1d as a 2-D convolution of height 1
        (3, 1, 10, 9, 8, 3, 1, 1, 1),  # a first layer on one input channel (groups=1)
        (3, 1, 11, 11, 4, 3, 2, 1, 1),
    ],
)
def test_native_depthwise_backward_equals_pytorch_on_the_kept_entries(shape):
    """The depthwise kernel reads the unpadded input (channels first) and leaves out the taps
    in the zero padding: PyTorch's gradients of the masked δ."""
    batch, channels, height, width, channels_out, size, stride, padding, dilation = shape
    generator = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(batch, channels, height, width, generator=generator, requires_grad=True)
    kernel = (1, size) if height == 1 else (size, size)
    pad = (0, padding) if height == 1 else (padding, padding)
    weight = torch.randn(channels_out, 1, *kernel, generator=generator, requires_grad=True)
    out = nn.functional.conv2d(x, weight, None, stride, pad, dilation, groups=channels)
    positions = out.shape[2] * out.shape[3]
    delta = torch.randn(batch, channels_out * positions, generator=generator)
    keep = torch.tensor([5, 0, 17][:batch])  # the second sample keeps nothing
    columns = [torch.randperm(delta.shape[1], generator=generator)[:k].sort().values for k in keep]
    mask = torch.zeros_like(delta)
    for sample, column in enumerate(columns):
        mask[sample, column] = 1
    out.backward((delta * mask).view_as(out))
    column = torch.cat(columns)
    rows = torch.repeat_interleave(torch.arange(batch), keep)
    row_start = torch.cat([torch.zeros(1, dtype=torch.long), keep.cumsum(0)])
    geometry = (batch, channels, height, width, channels_out, *kernel, *out.shape[2:])
    geometry += (
        1 if height == 1 else stride,
        stride,
        pad[0],
        pad[1],
        1 if height == 1 else dilation,
    )
    geometry += (dilation, channels)
    grad_input, grad_weight = native.plane_conv_backward(
        x.detach(), weight.detach().reshape(channels_out, *kernel), geometry, row_start, column,
        delta[rows, column], True, True,
    )  # fmt: skip
    torch.testing.assert_close(grad_input, x.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        grad_weight, weight.grad.reshape(grad_weight.shape), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize(
    "config",
    [
        tinyprop.TinyPropConfig(policy="topk", ratio=0.3),
        tinyprop.TinyPropConfig(policy="tinyprop", zeta=1.0),
        tinyprop.TinyPropConfig(policy="tinypropv2", zeta=1.0, skip_threshold=0.5),
        tinyprop.TinyPropConfig(policy="randomk", ratio=0.2),
    ],
    ids=lambda config: config.policy,
)
@pytest.mark.parametrize("name", list(BUILDERS))
def test_native_training_matches_pytorch_kernels(name, config, monkeypatch):
    """Three float32 steps of each test model (MLP, CNN with depthwise and dilated convs,
    Conv1d with padding='same', ResNet with BatchNorm): same k, skips and Ymax as with the
    PyTorch kernels; weights equal up to float rounding."""
    thresholds = (
        "NATIVE_DENSE",
        "NATIVE_CONV_DENSE",
        "NATIVE_DEPTHWISE_DENSE",
        "NATIVE_ONE_CHANNEL_DENSE",
        "DENSE",
        "CONV_DENSE",
    )
    for threshold in thresholds:
        monkeypatch.setattr(tinyprop.autograd, f"{threshold}_KERNEL_DENSITY", float("inf"))
    monkeypatch.setattr(tinyprop.autograd, "NATIVE_CONV_MIN_FAN_IN", 0)
    reference = tinyprop.apply(build(name, dtype=torch.float32), config)
    model = copy.deepcopy(reference)
    batches = [batch(name, size=8, seed=seed, dtype=torch.float32) for seed in range(3)]
    calls = []
    for kernel in ("linear_backward", "conv_backward", "plane_conv_backward"):
        original = getattr(native, kernel)
        monkeypatch.setattr(
            native,
            kernel,
            lambda *args, original=original, **options: (
                calls.append(1) or original(*args, **options)
            ),
        )
    results = []
    for use_native in (True, False):
        if not use_native:
            monkeypatch.setattr(native, "can_select", lambda scores: False)
            monkeypatch.setattr(native, "can_backward", lambda x, weight: False)
        trained = reference if not use_native else model
        optimizer = torch.optim.SGD(trained.parameters(), lr=0.1)
        stats = [tinyprop.train_step(trained, x, y, LOSS, optimizer) for x, y in batches]
        results.append(stats)
    assert calls, "the native kernels did not run"
    for native_stats, torch_stats in zip(*results, strict=True):
        assert torch.equal(native_stats.trained_mask, torch_stats.trained_mask)
        for name, keep in native_stats.keep.items():
            assert torch.equal(keep, torch_stats.keep[name])
    for (name, value), expected in zip(
        model.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(value, expected, rtol=1e-4, atol=1e-5, msg=name)


def test_batch_of_one_native_weight_gradient_has_k_rows(monkeypatch):
    monkeypatch.setattr(tinyprop.autograd, "NATIVE_DENSE_KERNEL_DENSITY", float("inf"))
    torch.manual_seed(0)  # tanh: no exact-zero gradients, so every kept row is non-zero
    model = nn.Sequential(
        nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 5)
    )
    tinyprop.apply(model, tinyprop.TinyPropConfig(policy="topk", ratio=0.25))
    x, y = batch("mlp", size=1, dtype=torch.float32)
    stats = tinyprop.train_step(model, x, y, LOSS, torch.optim.SGD(model.parameters(), lr=0.0))
    for name in ("0", "2", "4"):
        layer = dict(model.named_modules())[name]
        k = int(keep_count(0.25, layer.out_features))
        assert stats.keep[name].tolist() == [k]
        assert int((layer.weight.grad.abs().sum(1) > 0).sum()) == k, name


@pytest.mark.parametrize(
    "sanitizers, cases, threading",
    [("address,undefined", 1000, "-fopenmp"), ("address,undefined", 1000, ""), ("thread", 300, "")],
    ids=["asan-openmp", "asan-pthreads", "tsan"],
)
def test_native_kernels_stay_in_bounds_under_sanitizers(tmp_path, sanitizers, cases, threading):
    """tests/native/sanitize.c drives every kernel with random shapes, exactly-sized buffers,
    any floats (NaN, ±Inf, denormals) and 1 to 4 threads, built with AddressSanitizer and UBSan
    (and AVX2 / AVX-512 where the CPU has them) with OpenMP threads as tinyprop builds it and
    with POSIX threads (its fallback), then with ThreadSanitizer (no data race), and checks
    every top-k output and status against the rule."""
    binary = tmp_path / "sanitize"
    source = Path(__file__).with_name("native") / "sanitize.c"
    flags = ["-O1", "-g", "-std=c99", f"-fsanitize={sanitizers}", "-fno-sanitize-recover=all"]
    flags += [threading] if threading else []
    command = [native._compiler(), *flags, "-march=native", str(source), str(native.SOURCE)]
    subprocess.run([*command, "-lm", "-o", str(binary)], check=True, capture_output=True)
    result = subprocess.run([str(binary), str(cases)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok"


def test_without_a_compiler_tinyprop_warns_and_trains_with_pytorch_kernels(tmp_path):
    script = (
        "import warnings, torch, tinyprop\n"
        "from tinyprop import native\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    assert native.library() is None\n"
        "assert 'could not compile its native kernels' in str(caught[0].message)\n"
        "model = tinyprop.apply(torch.nn.Sequential(torch.nn.Linear(8, 4)),\n"
        "                       tinyprop.TinyPropConfig(policy='topk', ratio=0.5))\n"
        "x, y = torch.randn(3, 8), torch.tensor([0, 1, 2])\n"
        "loss = torch.nn.CrossEntropyLoss(reduction='none')\n"
        "stats = tinyprop.train_step(model, x, y, loss, torch.optim.SGD(model.parameters(), 0.1))\n"
        "print(stats.keep['0'].tolist())\n"
    )
    environment = {**os.environ, "CC": str(tmp_path / "no-such-compiler")}
    environment["TINYPROP_CACHE"] = str(tmp_path / "cache")
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=environment
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[2, 2, 2]"


@pytest.mark.parametrize("threads", [2, 3, 8])
def test_native_kernels_are_identical_at_every_thread_count(threads, monkeypatch):
    """Each kernel splits its work along outputs no two threads share, every output summed in
    the same order: bit-identical results whatever torch's thread count."""
    monkeypatch.setattr(native, "SELECTION_GRAIN", 1)  # split even these small problems
    monkeypatch.setattr(native, "BACKWARD_GRAIN", 1)
    generator = torch.Generator().manual_seed(threads)
    delta = torch.randn(7, 3000, generator=generator) * (torch.rand(7, 3000) < 0.3)
    keep = torch.randint(1, 400, (7,), generator=generator)
    x, weight = torch.randn(7, 300, generator=generator), torch.randn(3000, 300)
    images = torch.randn(5, 9, 9, 6, generator=generator)  # (B, Hp, Wp, C_in), 2 groups
    kernels = torch.randn(8, 3, 3, 3, generator=generator)  # (C_out, kh, kw, C_in / G)
    shape = (5, 9, 9, 6, 8, 3, 3, 7, 7, 1, 1, 1, 1, 2)
    conv_row_start = torch.tensor([0, 40, 40, 90, 150, 200])
    conv_column = torch.randint(0, 8 * 49, (200,), generator=generator)
    conv_value = torch.randn(200, generator=generator)
    planes = torch.randn(5, 4, 9, 9, generator=generator)  # (B, C_in, H, W), depthwise
    plane_kernels = torch.randn(8, 3, 3, generator=generator)  # (C_out, kh, kw), 2 per group
    plane_shape = (5, 4, 9, 9, 8, 3, 3, 7, 7, 1, 1, 0, 0, 1, 1, 4)

    def run():
        rows, columns, values = native.topk(delta, keep)
        masked = native.topk(delta.double(), keep, masked=True)
        row_start = torch.cat([torch.zeros(1, dtype=torch.long), keep.cumsum(0)])
        linear = native.linear_backward(x, weight, row_start, columns, values, True, True)
        conv = native.conv_backward(
            images, kernels, shape, conv_row_start, conv_column, conv_value, True, True
        )
        conv_planes = native.conv_backward(
            images, kernels, shape, conv_row_start, conv_column, conv_value, True, True,
            pads=(1, 0, 2, 1),
        )  # fmt: skip
        plane = native.plane_conv_backward(
            planes, plane_kernels, plane_shape, conv_row_start, conv_column, conv_value, True, True
        )
        return [rows, columns, values, masked, *linear, *conv, *conv_planes, *plane]

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run()
        torch.set_num_threads(threads)
        assert native.threads_for(10**9, 1) == threads
        for one, many in zip(single, run(), strict=True):
            assert torch.equal(one, many)
    finally:
        torch.set_num_threads(before)


def test_step_stats_name_the_kernel_of_every_layer():
    """StepStats.kernels: a small fan-in convolution on several input channels runs the dense
    kernels on the masked δ, a larger one and a first layer on one input channel the native
    sparse kernel; unified top-k the dense kernels on its kept channels (of its kept groups for
    a depthwise conv); the ledger counts the same k either way."""
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.ReLU(),  # fan-in 9, one input channel
        nn.Conv2d(8, 8, 3), nn.ReLU(),  # fan-in 72
        nn.Conv2d(8, 8, 3, groups=8), nn.ReLU(),  # depthwise
        nn.Conv2d(8, 2, 1), nn.Flatten(),  # fan-in 8
        nn.Linear(2 * 4 * 4, 3),
    )  # fmt: skip
    x, y = torch.randn(4, 1, 10, 10), torch.tensor([0, 1, 2, 0])
    per_sample = tinyprop.apply(copy.deepcopy(model), tinyprop.TinyPropConfig("topk", ratio=0.05))
    optimizer = torch.optim.SGD(per_sample.parameters(), lr=0.0)
    stats = tinyprop.train_step(per_sample, x, y, LOSS, optimizer)
    assert stats.kernels["0"] == tinyprop.autograd.NATIVE_SPARSE
    assert stats.kernels["2"] == tinyprop.autograd.NATIVE_SPARSE
    assert stats.kernels["6"] == tinyprop.autograd.MASKED_DENSE
    unified = tinyprop.apply(model, tinyprop.TinyPropConfig("topk", ratio=0.05, unified=True))
    optimizer = torch.optim.SGD(unified.parameters(), lr=0.0)
    stats = tinyprop.train_step(unified, x, y, LOSS, optimizer)
    assert stats.kernels["2"] == tinyprop.autograd.KEPT_CHANNELS
    assert stats.kernels["4"] == tinyprop.autograd.KEPT_GROUPS
    assert set(stats.kernels.values()) <= set(tinyprop.autograd.KERNELS)


def small_cnn_on_one_channel() -> nn.Module:
    """A first convolution on one input channel (the native plane kernel), ReLU and max pooling
    (δ mostly zeros), a wider convolution (the channels-last kernel) and a Linear head."""
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 8, 6, 6)
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # fan-in 72, (B, 16, 3, 3)
        nn.Flatten(), nn.Linear(16 * 3 * 3, 4),
    )  # fmt: skip


@pytest.mark.parametrize("policy", ["topk", "tinyprop"])
def test_cnn_native_training_equals_pytorch_kernels_at_1_2_4_threads(policy, monkeypatch):
    """Three steps of a CNN whose layers all run native kernels (a first layer on one channel
    included): the same kept entries as PyTorch's kernels, weights equal up to rounding, and
    bit-identical weights at 1, 2 and 4 torch threads (the work split into parts of any size)."""
    monkeypatch.setattr(native, "SELECTION_GRAIN", 1)
    monkeypatch.setattr(native, "BACKWARD_GRAIN", 1)
    monkeypatch.setattr(native, "LAYOUT_GRAIN", 1)
    thresholds = ("NATIVE_DENSE", "NATIVE_CONV_DENSE", "NATIVE_DEPTHWISE_DENSE")
    for threshold in (*thresholds, "NATIVE_ONE_CHANNEL_DENSE"):
        monkeypatch.setattr(tinyprop.autograd, f"{threshold}_KERNEL_DENSITY", float("inf"))
    config = tinyprop.TinyPropConfig(policy=policy, ratio=0.1, zeta=1.0)
    generator = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(6, 1, 12, 12, generator=generator), torch.randint(0, 4, (6,)))
        for _ in range(3)
    ]

    def train(threads: int, use_native: bool = True):
        model = tinyprop.apply(small_cnn_on_one_channel(), config)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        with monkeypatch.context() as patch:
            if not use_native:
                patch.setattr(native, "can_select", lambda scores: False)
                patch.setattr(native, "can_backward", lambda x, weight: False)
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                stats = [tinyprop.train_step(model, x, y, LOSS, optimizer) for x, y in batches]
            finally:
                torch.set_num_threads(before)
        return model, stats

    reference, reference_stats = train(1, use_native=False)
    single, single_stats = train(1)
    assert single_stats[-1].kernels["0"] == tinyprop.autograd.NATIVE_SPARSE
    assert single_stats[-1].kernels["3"] == tinyprop.autograd.NATIVE_SPARSE
    for native_step, torch_step in zip(single_stats, reference_stats, strict=True):
        for name, keep in native_step.keep.items():
            assert torch.equal(keep, torch_step.keep[name]), name
    for (name, value), expected in zip(
        single.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(value, expected, rtol=1e-4, atol=1e-5, msg=name)
    for threads in (2, 4):
        model, _ = train(threads)
        for (name, value), expected in zip(
            model.state_dict().items(), single.state_dict().values(), strict=True
        ):
            assert torch.equal(value, expected), (threads, name)
