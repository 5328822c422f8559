"""A few rows' convolution weight gradient by PyTorch's plain kernel instead of oneDNN's
(tinyprop.patches.ConvPatches.few_rows_kernel): equal to oneDNN's up to float32 rounding, the
input gradient bit for bit, and whole fine-tuning runs keep the same samples and entries."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tinyprop
from tinyprop import patches
from tinyprop.bench import runner, suites, training
from tinyprop.data import cache_dir
from tinyprop.optim import make_optimizer
from tinyprop.patches import ConvPatches

# |plain - oneDNN| <= RELATIVE · Σ_rows,positions |δ| · max |x| (each weight gradient element
# sums R' · P products: float32 rounding of such a sum stays far below this)
RELATIVE = 1e-6


DATASET_FILES = {"har": "basicmotions/*.npz"}  # in cache_dir()


def onednn_only(monkeypatch):
    """Every convolution backward through ``convolution_backward`` (the code before)."""
    monkeypatch.setattr(patches, "FEW_ROWS_MACS", 0)


@pytest.mark.parametrize(
    "layer, shape",
    [
        (nn.Conv1d(16, 32, 5, padding=2), (8, 16, 50)),  # the HAR CNN's
        (nn.Conv1d(6, 16, 5, padding=2, stride=2), (3, 6, 100)),
        (nn.Conv2d(8, 16, 3, padding=1), (6, 8, 14, 14)),  # the MNIST CNN's
        (nn.Conv2d(3, 8, (3, 2), padding=(1, 0), stride=(2, 1)), (4, 3, 9, 7)),
    ],
)
@pytest.mark.parametrize("needs_input", [True, False])
def test_few_rows_weight_gradient_is_onednns_up_to_rounding(layer, shape, needs_input, monkeypatch):
    generator = torch.Generator().manual_seed(0)
    weight = layer.weight.detach()
    calls = []
    plain = ConvPatches._plain_weight_gradient
    monkeypatch.setattr(
        ConvPatches, "_plain_weight_gradient", lambda *a: calls.append(1) or plain(*a)
    )
    for rows in ([0, 2], [1], list(range(shape[0]))):
        geometry = ConvPatches(layer, torch.Size(shape))
        x = torch.randn(shape, generator=generator)
        index = torch.tensor(rows)
        masked = torch.randn(len(rows), geometry.channels_out * geometry.positions)
        masked[masked.abs() < 1.0] = 0  # a masked δ: the kept entries, zeros elsewhere
        calls.clear()
        fast = geometry.dense_gradients(x, weight, index, masked, needs_input, True)
        assert len(calls) == (len(rows) > 1)  # one row: convolution_backward (plain there)
        with monkeypatch.context() as patch:
            onednn_only(patch)
            reference = geometry.dense_gradients(x, weight, index, masked, needs_input, True)
        if needs_input:
            assert torch.equal(fast[0], reference[0])  # the δ of the layer below: same bits
        else:
            assert fast[0] is None and reference[0] is None
        bound = RELATIVE * float(masked.abs().sum()) * float(x.abs().max())
        torch.testing.assert_close(fast[1], reference[1], rtol=0, atol=bound)
        # and both are PyTorch's own backward of the layer, on those rows
        inputs = x[index].requires_grad_()
        out = nn.functional.conv1d if isinstance(layer, nn.Conv1d) else nn.functional.conv2d
        output = out(inputs, weight.requires_grad_(), None, layer.stride, layer.padding)
        (expected,) = torch.autograd.grad(output, weight, masked.reshape(output.shape))
        weight.requires_grad_(False)
        torch.testing.assert_close(fast[1], expected, rtol=0, atol=bound)


def test_the_plain_kernel_is_left_to_large_grouped_or_dilated_convolutions():
    cases = [
        (nn.Conv2d(8, 16, 3, padding=1), (2, 8, 14, 14), True),
        (nn.Conv2d(64, 64, 3, padding=1), (2, 64, 16, 16), False),  # 9.4M MACs a row
        (nn.Conv2d(8, 16, 3, padding=1, groups=2), (2, 8, 14, 14), False),
        (nn.Conv1d(8, 16, 3, padding=2, dilation=2), (2, 8, 30), False),
    ]
    for layer, shape, expected in cases:
        geometry = ConvPatches(layer, torch.Size(shape))
        padded = geometry._padded(torch.zeros(shape))
        assert geometry.few_rows_kernel(padded) is expected
        assert not geometry.few_rows_kernel(padded[:1])  # one row
        assert not geometry.few_rows_kernel(padded.double())


# inputs whose strides are not the contiguous ones: (layer, a function of the rows giving x)
STRIDED_INPUTS = {
    # a Conv1d on a (B, T, D) sequence transposed to (B, D, T): channels-last strides
    "conv1d_on_transposed": (nn.Conv1d(8, 16, 3), lambda rows: torch.randn(rows, 20, 8).mT),
    "conv1d_on_every_second_step": (nn.Conv1d(8, 16, 3), lambda r: torch.randn(r, 8, 40)[..., ::2]),
    "conv2d_on_transpose_2_3": (nn.Conv2d(8, 16, 3), lambda r: torch.randn(r, 8, 9, 9).mT),
    "conv2d_on_every_second_channel": (
        nn.Conv2d(8, 16, 3, stride=2),
        lambda rows: torch.randn(rows, 16, 9, 9)[:, ::2],
    ),
    "conv2d_on_channels_last": (
        nn.Conv2d(8, 16, 3),
        lambda rows: torch.randn(rows, 8, 9, 9).contiguous(memory_format=torch.channels_last),
    ),
}


@pytest.mark.parametrize("case", list(STRIDED_INPUTS))
def test_few_rows_of_a_strided_input_give_the_contiguous_inputs_gradients(case, monkeypatch):
    """The plain kernel reads its input in the default strides (patches.default_strides
    gives it them): on x[..., ::2] or x.transpose(2, 3) (no padding to copy it) the weight
    gradient was 0.3-0.5 off, silently, and a channels-last input (a Conv1d on a transposed
    sequence; transformers' ConvNeXt, whose channels-first LayerNorm permutes) raised
    'slow_conv2d: grad_weight must be contiguous' (tests/test_input_layouts.py: channels-last
    Conv2d models and inputs). Now: the contiguous copy's gradients bit for bit, and
    PyTorch's up to float32 rounding."""
    calls = []
    plain_kernel = ConvPatches._plain_weight_gradient
    monkeypatch.setattr(
        ConvPatches, "_plain_weight_gradient", lambda *a: calls.append(1) or plain_kernel(*a)
    )
    layer, draw = STRIDED_INPUTS[case]
    torch.manual_seed(0)
    x = draw(2)  # (2, C_in, ...) two rows: the plain kernel's
    assert not x.is_contiguous()
    plain = nn.Sequential(copy.deepcopy(layer), nn.Flatten(), nn.LazyLinear(3))
    plain(x)  # the head's weights drawn
    y = torch.tensor([0, 2])
    config = tinyprop.TinyPropConfig("topk", ratio=1.0)
    strided, contiguous = (tinyprop.apply(copy.deepcopy(plain), config) for _ in range(2))
    loss = nn.CrossEntropyLoss(reduction="none")
    tinyprop.backward(strided, loss(strided(x), y))
    tinyprop.backward(contiguous, loss(contiguous(x.contiguous()), y))
    assert len(calls) == 2  # both ran the plain kernel
    loss(plain(x), y).mean().backward()
    models = (strided, contiguous, plain)
    for got, same, expected in zip(*(m.parameters() for m in models), strict=True):
        assert torch.equal(got.grad, same.grad)
        torch.testing.assert_close(got.grad, expected.grad, rtol=0, atol=1e-6)


def finetune_run(dataset: str) -> tuple[list, dict]:
    """Each step's trained samples and k of each layer's rows, and the final weights, of the
    bench's finetune run (small suite, seed 0, tinypropv2 with the bench's setting)."""
    (spec,) = runner.plan_runs(
        suites.get("small"), "finetune", "/nonexistent", datasets=[dataset],
        policies=["tinypropv2"], seeds=[0], max_settings=1,
    )  # fmt: skip
    pretrained = runner.pretrained_state(spec)
    pool, _, splits, _, model = runner.prepare(spec)
    model.load_state_dict(pretrained)
    config = tinyprop.TinyPropConfig(
        policy="tinypropv2", seed=0, skip_threshold=0.5, zeta=1.0
    )  # the bench's setting (benchmarks/finetune_speed.py)
    model = tinyprop.apply(copy.deepcopy(model), config)
    optimizer = make_optimizer("adam", model, spec.plan.lr)
    x, y = pool.x[splits.train], pool.y[splits.train]
    steps = []
    for _, index in training.batches(len(x), spec.plan.batch_size, spec.plan.epochs, 2000):
        stats = tinyprop.train_step(
            model, x[index], y[index], training.per_sample_cross_entropy, optimizer
        )
        keep = {name: k.tolist() for name, k in stats.keep.items()}
        steps.append((stats.trained_mask.tolist(), keep))
    return steps, copy.deepcopy(model.state_dict())


@pytest.mark.parametrize("threads", [1, 2])
def test_finetune_runs_keep_the_same_samples_and_entries(threads, monkeypatch):
    """The bench's har finetune run (its CNN; mnist's finetune model is the MLP, which has no
    convolution), with the plain kernel on a few rows and with oneDNN's everywhere: the same
    skips and k of every row at every step, weights equal up to rounding."""
    dataset = "har"
    if not any(cache_dir().glob(DATASET_FILES[dataset])):
        pytest.skip(f"the {dataset} data is not in the cache (tinyprop bench downloads it)")
    before = torch.get_num_threads()
    calls = []
    plain = ConvPatches._plain_weight_gradient
    monkeypatch.setattr(
        ConvPatches, "_plain_weight_gradient", lambda *a: calls.append(1) or plain(*a)
    )
    torch.set_num_threads(threads)
    try:
        fast, fast_weights = finetune_run(dataset)
        assert calls  # the plain kernel ran
        onednn_only(monkeypatch)
        reference, weights = finetune_run(dataset)
    finally:
        torch.set_num_threads(before)
    assert fast == reference
    assert 0 < sum(sum(mask) for mask, _ in reference) < sum(len(mask) for mask, _ in reference)
    for name, tensor in weights.items():
        if tensor.is_floating_point():
            torch.testing.assert_close(fast_weights[name], tensor, rtol=1e-4, atol=1e-6)
