"""The cheaper step of a fine-tuning batch: k and the skip decision of a few rows in Python
floats, no step loss or backward when every sample is skipped, the running state written
after the gradient check instead of copied before every step. Each must leave the training
bit for bit as the tensor code has it: same skips, same k, same weights, ledger and state."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from core_models import build
from torch import nn

import tinyprop
import tinyprop.autograd
import tinyprop.functional
from tinyprop.functional import (
    adaptive_keep_count,
    running_max,
    scalar_keep_counts,
    scalar_running_max,
    scalar_skip_decision,
    skip_decision,
)


def tensor_code(monkeypatch):
    """Every row count goes through the tensor code (the code before the scalar paths)."""
    monkeypatch.setattr(tinyprop.functional, "SCALAR_ROWS", 0)


def test_keep_counts_in_python_floats_are_the_tensor_code_bit_for_bit(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    cases = []
    for rows in (1, 2, 7, 64):
        error = torch.rand(rows, generator=generator, dtype=torch.float64) * 10.0
        error[::3] = 0.0  # zero rows
        error_max = running_max(error, torch.tensor(3.0, dtype=torch.float64))
        cases.append((error, error_max))
        cases.append((error, torch.zeros(rows, dtype=torch.float64)))  # Ymax = 0: k = 1
        cases.append((error.float(), error_max.float()))  # float32 inputs
    # a ratio · N landing exactly on a half: round half up in both
    cases.append((torch.tensor([1.0, 3.0]), torch.tensor([2.0, 4.0])))
    nan = torch.tensor([float("nan"), 1.0], dtype=torch.float64)
    cases.append((nan, torch.tensor([2.0, 2.0], dtype=torch.float64)))  # left to the tensors
    cases.append((torch.tensor([1.0, 2.0]), torch.tensor([float("nan"), 2.0])))
    settings = [
        (0.05, 0.5, 1.0, 0, 1600, 1.0),
        (0.0, 1.0, 0.5, 3, 10, 1.0),
        (0.1, 0.9, 0.8, 2, 4096, 0.37),  # a budget's keep scale c
        (0.2, 0.2, 1.0, 1, 7, 1e4),  # k past N: clamped
        (0.0, 1.0, 1.0, 0, 10, 0.0),  # k = 0: at least 1
    ]
    for error, error_max in cases:
        for setting in settings:
            fast = adaptive_keep_count(error, error_max, *setting)
            with monkeypatch.context() as patch:
                tensor_code(patch)
                reference = adaptive_keep_count(error, error_max, *setting)
            assert fast.dtype == reference.dtype == torch.long
            assert torch.equal(fast, reference), (error, error_max, setting)
    # the counts ask the tensor code to decide values that are not finite or too large
    assert scalar_keep_counts([float("nan")], [1.0], 0.0, 1.0, 1.0, 0, 10, 1.0) is None
    assert scalar_keep_counts([1.0], [1.0], 0.0, 1.0, 1.0, 0, 2**62, 10.0) is None
    assert scalar_keep_counts([1.0, 0.5], [1.0, 1.0], 0.0, 1.0, 1.0, 0, 10, 1.0) == [10, 5]


def test_skip_decision_in_python_floats_is_the_tensor_code_bit_for_bit():
    generator = torch.Generator().manual_seed(1)
    for rows in (1, 3, 8, 32):
        scores = torch.rand(rows, generator=generator, dtype=torch.float64) * 4.0
        scores[rows // 2] = 0.0
        for previous in (0.0, 1.5, 100.0):
            for d_min, d_max, beta, threshold in ((0.0, 1.0, 1.0, 0.5), (0.1, 0.9, 1.2, 0.75)):
                trained, last = scalar_skip_decision(
                    scores.tolist(), previous, d_min, d_max, beta, threshold
                )
                error_max = running_max(scores, torch.tensor(previous, dtype=torch.float64))
                expected = skip_decision(scores, error_max, d_min, d_max, beta, threshold)
                assert trained == expected.tolist()
                assert last == float(error_max[-1])
                assert math.copysign(1.0, last) == math.copysign(1.0, float(error_max[-1]))
    # D exactly at τ trains the sample (D >= τ): α = 1 / 2 for the second sample
    assert scalar_skip_decision([2.0, 1.0], 0.0, 0.0, 1.0, 1.0, 0.5) == ([True, True], 2.0)
    assert scalar_skip_decision([2.0, 0.5], 0.0, 0.0, 1.0, 1.0, 0.5) == ([True, False], 2.0)
    assert scalar_skip_decision([1.0, float("inf")], 0.0, 0.0, 1.0, 1.0, 0.5) is None
    assert scalar_skip_decision([1.0], float("nan"), 0.0, 1.0, 1.0, 0.5) is None


class SmallNormed(nn.Module):
    """Conv2d, BatchNorm2d, Linear, BatchNorm1d: BatchNorm couples the samples."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten()
        )
        self.head = nn.Sequential(
            nn.Linear(6 * 36, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4)
        )

    def forward(self, x):
        return self.head(self.features(x))


def learnable_batches(shape, steps=30, batch=8, seed=0):
    """Labels from a fixed linear map of the inputs (so that samples get skipped as training
    goes), every third batch of 5 samples."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(steps * batch, *shape, generator=generator)
    labels = (x.flatten(1) @ torch.randn(x[0].numel(), 4, generator=generator)).argmax(1)
    sizes = [5 if step % 3 == 2 else batch for step in range(steps)]
    starts = [sum(sizes[:step]) for step in range(steps)]
    return [(x[s : s + n], labels[s : s + n]) for s, n in zip(starts, sizes, strict=True)]


def conv1d_model() -> nn.Sequential:
    """The HAR CNN's shape: convolutions of fan-in 40 and 80 (the native convolution kernel)
    and 160, max and average pooling, a Linear head."""
    return nn.Sequential(
        nn.Conv1d(8, 16, 5, padding=2), nn.ReLU(), nn.MaxPool1d(2),
        nn.Conv1d(16, 32, 5, padding=2), nn.ReLU(), nn.MaxPool1d(2),
        nn.Conv1d(32, 32, 5, padding=2), nn.ReLU(), nn.AvgPool1d(6), nn.Flatten(),
        nn.Linear(32, 4),
    )  # fmt: skip


def train(model_name, optimizer_name, budget, policy="tinypropv2", **settings):
    """Every step's stats and the final model and optimizer state of a run (tinypropv2 by
    default)."""
    torch.manual_seed(0)
    if model_name == "normed":
        model, shape = SmallNormed(), (1, 6, 6)
    elif model_name == "conv1d":
        model, shape = conv1d_model(), (8, 24)
    elif model_name == "wide":  # a 784-wide input layer, as the MNIST MLP's
        model = nn.Sequential(nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 4))
        shape = (784,)
    else:
        model = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(),
                              nn.Linear(24, 4))  # fmt: skip
        shape = (12,)
    skips = {"skip_threshold": 0.9} if policy == "tinypropv2" else {}
    config = tinyprop.TinyPropConfig(
        policy=policy, zeta=1.0, budget=budget, seed=0, **skips, **settings
    )
    model = tinyprop.apply(model, config)
    if optimizer_name == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    steps = []
    for x, y in learnable_batches(shape):
        stats = tinyprop.train_step(model, x, y, loss_fn, optimizer)
        steps.append(
            (stats.loss, stats.trained, stats.trained_mask.tolist(), stats.stepped,
             vars(stats.macs).copy(), {name: k.tolist() for name, k in stats.keep.items()},
             dict(stats.kernels))
        )  # fmt: skip
    return steps, copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())


def assert_same_bits(first, second):
    if isinstance(first, torch.Tensor):
        assert first.dtype == second.dtype and first.shape == second.shape
        if first.is_floating_point():  # NaN (an empty score window) and the sign of zero
            first, second = (
                first.reshape(-1).view(torch.uint8),
                second.reshape(-1).view(torch.uint8),
            )
        assert torch.equal(first, second)
    elif isinstance(first, dict):
        assert first.keys() == second.keys()
        for key in first:
            assert_same_bits(first[key], second[key])
    elif isinstance(first, (list, tuple)):
        assert len(first) == len(second)
        for a, b in zip(first, second, strict=True):
            assert_same_bits(a, b)
    elif isinstance(first, float) and math.isnan(first):
        assert math.isnan(second)
    else:
        assert first == second


@pytest.mark.parametrize("budget", [None, 0.2])
@pytest.mark.parametrize("optimizer_name", ["adam", "sgd"])
@pytest.mark.parametrize("model_name", ["mlp", "normed"])
def test_training_is_bit_identical_with_the_scalar_paths(
    model_name, optimizer_name, budget, monkeypatch
):
    """Mixed batches (some skip every sample, some none, some a few), Adam and SGD-momentum,
    with and without a budget, with BatchNorm: the same steps, weights, ledger and state."""
    fast = train(model_name, optimizer_name, budget)
    tensor_code(monkeypatch)
    reference = train(model_name, optimizer_name, budget)
    trained = [step[1] for step in reference[0]]
    assert 0 < sum(trained) < sum(len(step[2]) for step in reference[0])  # some skipped
    if budget is None:
        assert min(trained) == 0  # batches that skip every sample
    assert_same_bits(fast, reference)


@pytest.mark.parametrize(
    "model_name, policy, settings",
    [
        ("conv1d", "tinypropv2", {}),
        ("conv1d", "tinypropv2", {"s_min": 0.0, "s_max": 0.1}),  # the native kernels
        ("wide", "tinypropv2", {"s_min": 0.0, "s_max": 0.1}),
        ("wide", "tinypropv2", {}),
        ("normed", "tinypropv2", {"drop_skipped_rows": True}),
        ("mlp", "tinypropv2", {"running_max_per_batch": True}),
        ("mlp", "tinypropv2", {"dense_output_layer": True}),
        ("conv1d", "tinypropv2", {"skip_zero_entries": True}),
        ("mlp", "tinyprop", {}),
        ("conv1d", "topk", {"ratio": 0.2}),
        ("mlp", "randomk", {"ratio": 0.3}),
    ],
)
def test_layer_bookkeeping_of_a_few_rows_is_the_tensor_code_bit_for_bit(
    model_name, policy, settings, monkeypatch
):
    """A layer's rows with a non-zero δ, running maximum and k of a few CPU rows in Python
    floats (tinyprop.autograd.few_rows): the same steps, k, weights, ledger and state as the
    tensor code, on the native convolution and Linear kernels, the masked dense kernels,
    dropped rows, a per-batch running maximum, a dense output layer, k capped at the non-zero
    entries, and the other policies."""
    calls = []
    original = tinyprop.autograd.few_rows
    monkeypatch.setattr(tinyprop.autograd, "few_rows", lambda *a: calls.append(1) or original(*a))
    fast = train(model_name, "adam", None, policy, **settings)
    assert calls  # the path under test ran
    tensor_code(monkeypatch)
    reference = train(model_name, "adam", None, policy, **settings)
    assert_same_bits(fast, reference)
    kernels = {kernel for step in reference[0] for kernel in step[6].values()}
    if settings.get("s_max") == 0.1:
        assert tinyprop.autograd.NATIVE_SPARSE in kernels


@pytest.mark.parametrize("threads", [1, 2, 4])
@pytest.mark.parametrize("model_name", ["conv1d", "wide"])
def test_few_rows_are_the_tensor_code_bit_for_bit_at_every_thread_count(
    model_name, threads, monkeypatch
):
    """The native kernels split their work by torch's thread count: at 1, 2 and 4 threads the
    run with the Python-float bookkeeping is the tensor code's, bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        settings = {"s_min": 0.0, "s_max": 0.1}
        fast = train(model_name, "adam", None, **settings)
        tensor_code(monkeypatch)
        reference = train(model_name, "adam", None, **settings)
    finally:
        torch.set_num_threads(before)
    assert_same_bits(fast, reference)


def test_running_max_in_python_floats_is_the_tensor_code_bit_for_bit():
    generator = torch.Generator().manual_seed(2)
    for rows in (1, 5, 64):
        errors = torch.rand(rows, generator=generator, dtype=torch.float64) * 3.0 + 1e-3
        for previous in (0.0, 1.0, 10.0):
            expected = running_max(errors, torch.tensor(previous, dtype=torch.float64))
            got = scalar_running_max(errors.tolist(), previous)
            assert got == expected.tolist()
            assert (
                scalar_running_max(errors.tolist(), previous, per_batch=True)
                == [float(expected[-1])] * rows
            )
    assert scalar_running_max([], 1.0) == []
    assert scalar_running_max([1.0, float("inf")], 0.0) is None
    assert scalar_running_max([1.0], float("nan")) is None


def test_a_step_that_skips_every_sample_runs_no_backward(monkeypatch):
    """No step loss, no backward, no optimizer step: the weights, the optimizer's state and
    the gradients stay as they were; Ymax_L and the ledger (forward and decision) are kept."""
    model = tinyprop.apply(build("mlp", dtype=torch.float32), tinyprop.TinyPropConfig())
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    x, y = torch.randn(6, 12), torch.randint(0, 5, (6,))
    tinyprop.train_step(model, x, y, loss_fn, optimizer)
    with torch.no_grad():
        model.tinyprop_output_error_max.fill_(1e6)  # every Y_L far below Ymax_L
    weights = copy.deepcopy(model.state_dict())
    moments = copy.deepcopy(optimizer.state_dict()["state"])
    backward_calls = []
    original = torch.Tensor.backward
    monkeypatch.setattr(
        torch.Tensor, "backward", lambda *a, **k: backward_calls.append(1) or original(*a, **k)
    )
    boundary_calls = []
    monkeypatch.setattr(tinyprop.step, "_step_scalar", lambda *a: boundary_calls.append(1) or None)
    stats = tinyprop.train_step(model, x, y, loss_fn, optimizer)
    assert (stats.trained, stats.skipped, stats.stepped) == (0, 6, False)
    assert backward_calls == [] and boundary_calls == []
    assert all(p.grad is None for p in model.parameters())
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights[name]), name  # Ymax_L stays 1e6 (the batch's max)
    for index, entry in optimizer.state_dict()["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, moments[index][key]), key
    assert stats.macs.forward > 0 and stats.macs.backward == 0 and stats.macs.selection > 0
    assert tinyprop.step_stats(model) is stats


@pytest.mark.parametrize("budget", [None, 0.5])
def test_a_refused_step_leaves_the_running_state_as_it_was(budget):
    """The gradient check refuses the step after the backward has finished: Ymax_l, Ymax_L,
    the backward counts, the score window and the budget controller keep their values (they
    are written only after the check passed)."""
    torch.manual_seed(0)
    model = tinyprop.apply(
        nn.Sequential(nn.Linear(4, 3)),
        tinyprop.TinyPropConfig(policy="tinypropv2", skip_threshold=0.0, budget=budget),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def wavy(output, target):  # finite at any finite output, |∂loss / ∂output| up to 100
        return 100 * torch.sin(output).sum(1)

    tinyprop.train_step(model, torch.randn(2, 4), torch.zeros(2), wavy, optimizer)
    with torch.no_grad():
        model[0].weight.fill_(0.25)
    before = copy.deepcopy(model.state_dict())
    x = torch.full((2, 4), 1e38)  # δ and x finite, the weight gradient past float32's range
    with pytest.raises(FloatingPointError, match="a parameter gradient is NaN or infinite"):
        tinyprop.train_step(model, x, torch.zeros(2), wavy, optimizer)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, equal_nan=True)
    assert all(p.grad is None for p in model.parameters())
    stats = tinyprop.train_step(model, torch.randn(2, 4), torch.zeros(2), wavy, optimizer)
    assert stats.stepped  # trains on afterwards
    assert int(model[0].backward_steps) == 2


def test_local_errors_of_a_few_rows_are_the_tensor_code_bit_for_bit():
    """few_rows divides Σ |δ| by the loss unit in Python floats: the float64 division of the
    tensor code (``magnitude.double() / unit``), bit for bit, from tiny to huge values."""
    generator = torch.Generator().manual_seed(3)
    for trial in range(200):
        rows = 1 + trial % 64
        scale = 10.0 ** (trial % 61 - 30)
        magnitude = torch.rand(rows, generator=generator) * scale  # float32 Σ |δ|
        for unit in (1.0, 1 / 32, 1 / 7, 0.1, 3.7e-5, 1e-300, 1e300):
            expected = (magnitude.double() / unit).tolist()
            assert [value / unit for value in magnitude.tolist()] == expected


def test_csr_offsets_of_a_few_rows_are_the_tensor_code():
    """The CSR offsets of the kept entries built from Python ints are the tensor code's."""
    keep = torch.tensor([3, 1, 4])
    for batch, rows in ((3, [0, 1, 2]), (6, [0, 2, 5]), (5, [1, 3, 4])):
        row_start = torch.zeros(batch + 1, dtype=torch.long)
        row_start[torch.tensor(rows) + 1] = keep
        expected = row_start.cumsum(0).tolist()
        assert tinyprop.autograd.csr_offsets(batch, rows, keep.tolist()) == expected


def test_tensors_of_a_few_rows_python_values_are_torch_tensor():
    """list_tensor (one full or arange where it can) gives what torch.tensor gives."""
    cases = [[], [7], [5] * 128, [0, 1, 2, 3], list(range(128)), [0, 2, 5], [1, 2, 3], [3, 1]]
    for values in cases:
        expected = torch.tensor(values, dtype=torch.long)
        made = tinyprop.functional.list_tensor(values, torch.long)
        assert made.dtype == expected.dtype and made.is_contiguous()
        assert made.shape == expected.shape and torch.equal(made, expected), values
    for flags in ([], [True] * 100, [False] * 3, [True, False, True], [False, True]):
        expected = torch.tensor(flags, dtype=torch.bool)
        made = tinyprop.functional.list_tensor(flags, torch.bool)
        assert made.dtype == torch.bool and torch.equal(made, expected), flags


@pytest.mark.parametrize("threads", [1, 2])
def test_native_kernels_reuse_their_scratch_across_shapes(threads):
    """The native top-k and Linear kernels keep their scratch between calls (one buffer per
    thread and dtype, grown when needed): a large call, a small one, a large one again give
    the gradients of fresh buffers, which are PyTorch's dense products of the kept δ."""
    if not tinyprop.native.can_select(torch.zeros(1, 1)):
        pytest.skip("no native kernels")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(4)
        for batch, outputs, inputs, k in ((64, 512, 300, 40), (3, 10, 7, 2), (64, 700, 257, 90)):
            delta = torch.randn(batch, outputs, generator=generator)
            x = torch.randn(batch, inputs, generator=generator)
            weight = torch.randn(outputs, inputs, generator=generator)
            keep = torch.full((batch,), k, dtype=torch.long)
            rows, columns, values = tinyprop.native.topk(delta, keep, total=batch * k)
            masked = torch.zeros_like(delta).index_put_((rows, columns), values)
            assert torch.equal(masked, tinyprop.native.topk(delta, keep, masked=True))
            row_start = torch.arange(batch + 1) * k
            grad_input, grad_weight = tinyprop.native.linear_backward(
                x, weight, row_start, columns, values, True, True
            )
            torch.testing.assert_close(grad_input, masked @ weight, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(grad_weight, masked.t() @ x, rtol=1e-4, atol=1e-4)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("policy", ["topk", "tinypropv2"])
def test_bias_gradients_are_proven_finite_and_not_read_again(policy, monkeypatch):
    """A sparse layer's bias gradient Σ δ is at most Σ Y_l · unit in size: proven finite by
    the bound, the step's gradient check does not sum it again (the weights of layers whose
    input is smaller than their weight are proven as before)."""
    torch.manual_seed(0)
    model = tinyprop.apply(
        nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 4)),
        tinyprop.TinyPropConfig(policy=policy, skip_threshold=0.0),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    original = tinyprop.trainer.check_gradients
    monkeypatch.setattr(
        tinyprop.trainer, "check_gradients", lambda o, p: seen.append(dict(p)) or original(o, p)
    )
    x, y = torch.randn(8, 40), torch.randint(0, 4, (8,))
    stats = tinyprop.train_step(model, x, y, nn.CrossEntropyLoss(reduction="none"), optimizer)
    assert stats.trained == 8
    (proven,) = seen
    for layer in (model[0], model[2]):
        assert proven[id(layer.bias)] == (layer.bias.grad.data_ptr(), layer.bias.grad._version)
    assert proven[id(model[0].weight)] is not None  # x (8, 40) smaller than the weight
    assert proven[id(model[2].weight)] is None  # x (8, 64) larger than the weight (4, 64)


def test_a_bias_gradient_past_its_range_is_still_refused():
    """The bound does not prove a bias gradient that overflows its dtype (float16: Σ δ =
    100,000 > 65,504 from two finite δ of 50,000): the step is refused as before."""
    model = tinyprop.apply(
        nn.Sequential(nn.Linear(2, 1)).half(), tinyprop.TinyPropConfig(policy="topk", ratio=1.0)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def large(output, target):  # float32 losses, ∂ loss_n / ∂ output_n = 100,000
        return (output.float() * 1e5).sum(1)

    x = torch.zeros(2, 2, dtype=torch.float16)
    with pytest.raises(FloatingPointError, match="a parameter gradient is NaN or infinite"):
        tinyprop.train_step(model, x, torch.zeros(2), large, optimizer)
    assert model[0].bias.grad is None  # zeroed, no update


def test_bounds_of_bias_and_weight_gradients():
    bounded = tinyprop.step._bounded
    assert bounded(None, 1e3, 0.5, torch.float32)
    assert not bounded(None, 1e38, 1.0, torch.float32)  # past a quarter of float32's range
    assert not bounded(None, 4e4, 0.5, torch.float16)
    assert not bounded(None, float("nan"), 1.0, torch.float32)
    x = torch.tensor([[-3.0, 2.0]])
    assert bounded(x, torch.tensor([1.0, 2.0], dtype=torch.float64), 1.0, torch.float32)
    assert bounded(x, 3.0, 1.0, torch.float32)  # a sum of Y_l as a float
    assert not bounded(x, 3e37, 1.0, torch.float32)  # 3 · 3e37 > max / 4
    assert not bounded(torch.tensor([[float("nan"), 1.0]]), 1.0, 1.0, torch.float32)


def test_row_copies_and_local_errors_are_the_indexing_code_bit_for_bit():
    """take / put copy rows with index_select / index_copy_ instead of advanced indexing, and
    local_error sums a 2-D δ without flatten: the same tensors, bit for bit, as the code they
    replace (float32 and float64, non-contiguous values, a (B,) and a (B, C, P) δ)."""
    from tinyprop.patches import put, take

    generator = torch.Generator().manual_seed(5)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(8, 6, 20, generator=generator, dtype=dtype)
        for rows in ([3], [0, 5], [1, 2, 7], list(range(8))):
            index = torch.tensor(rows)
            assert_same_bits(take(x, index), x[index])
            values = torch.randn(len(rows), 20, 6, generator=generator, dtype=dtype)
            values = values.transpose(1, 2)  # (R', 6, 20), not contiguous
            expected = values.contiguous() if len(rows) == 8 else x.new_zeros(x.shape)
            if len(rows) < 8:
                expected[index] = values
            assert_same_bits(put(values, index, x.shape), expected)
        delta = torch.randn(5, 7, generator=generator, dtype=dtype) * 1e3
        assert_same_bits(tinyprop.functional.local_error(delta), delta.abs().flatten(1).sum(1))
        delta3 = torch.randn(5, 4, 9, generator=generator, dtype=dtype)
        assert_same_bits(tinyprop.functional.local_error(delta3), delta3.abs().flatten(1).sum(1))


def test_backward_counts_of_every_layer_are_written_in_one_dispatch():
    """The layers' backward counts are added by one dispatch per count: each layer counts
    the backward passes it ran (two calls of one layer in a step count two)."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x):
            return self.second(torch.relu(self.first(torch.relu(self.first(x)))))

    torch.manual_seed(0)
    model = tinyprop.apply(Twice(), tinyprop.TinyPropConfig(policy="topk", ratio=0.5))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    for _ in range(3):
        tinyprop.train_step(model, torch.randn(5, 4), torch.randint(0, 3, (5,)), loss_fn, optimizer)
    assert int(model.first.backward_steps) == 6
    assert int(model.second.backward_steps) == 3
