"""train_step(fused_update=True): SGD's update of the sparse Linear weights from the kept
entries, without a weight gradient, gives the weights torch.optim.SGD gives."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tinyprop
import tinyprop.native
from tinyprop.autograd import FUSED_UPDATE, NATIVE_SPARSE

pytestmark = pytest.mark.skipif(
    tinyprop.native.library() is None, reason="the fused update runs in the native kernels"
)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(20, 96), nn.ReLU(), nn.Linear(96, 96), nn.ReLU(), nn.Linear(96, 5)
    )


def train(policy: str, fused: bool, steps: int = 6, threads: int = 1, **sgd):
    torch.set_num_threads(threads)
    model = tinyprop.apply(mlp(), tinyprop.TinyPropConfig(policy=policy, ratio=0.1))
    optimizer = torch.optim.SGD(model.parameters(), **{"lr": 0.05, **sgd})
    generator = torch.Generator().manual_seed(1)
    kernels = []
    for _ in range(steps):
        x = torch.randn(3, 20, generator=generator)  # (3, 20): smaller than the weights
        y = torch.randint(0, 5, (3,), generator=generator)
        stats = tinyprop.train_step(
            model, x, y, nn.CrossEntropyLoss(reduction="none"), optimizer, fused_update=fused
        )
        kernels.append(stats.kernels)
    return model, kernels


@pytest.mark.parametrize("policy", ["topk", "tinypropv2"])
@pytest.mark.parametrize("threads", [1, 2])
def test_fused_update_gives_sgds_weights(policy, threads):
    threads_before = torch.get_num_threads()
    try:
        plain, plain_kernels = train(policy, fused=False, threads=threads)
        fused, fused_kernels = train(policy, fused=True, threads=threads)
    finally:
        torch.set_num_threads(threads_before)
    for (name, expected), actual in zip(
        plain.state_dict().items(), fused.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7, msg=name)
    assert any(FUSED_UPDATE in kernels.values() for kernels in fused_kernels)
    assert all(FUSED_UPDATE not in kernels.values() for kernels in plain_kernels)
    # a layer whose update was fused in the last step has no weight gradient; its bias has one
    for name, kernel in fused_kernels[-1].items():
        layer = fused[int(name)]
        assert (layer.weight.grad is None) == (kernel == FUSED_UPDATE), name
        assert layer.bias.grad is not None


SGD_WITH_MOMENTUM = [
    {"momentum": 0.9},
    {"momentum": 0.8, "dampening": 0.1},
    {"momentum": 0.9, "nesterov": True},
]


@pytest.mark.parametrize("sgd", SGD_WITH_MOMENTUM, ids=["momentum", "dampening", "nesterov"])
@pytest.mark.parametrize("threads", [1, 2, 4])
def test_fused_update_with_momentum_is_sgds_step_bit_for_bit(sgd, threads):
    """SGD with momentum (dampening, Nesterov) fused: the same weights and the same momentum
    buffers as torch.optim.SGD's step on the native weight gradient, bit for bit, at 1, 2 and
    4 threads; the buffers are the optimizer's own state, so the fused weights and the others
    (biases) step alike, and rows nobody kept move with their buffer as in SGD."""
    threads_before = torch.get_num_threads()
    try:
        plain, plain_kernels, plain_optimizer = train_with_optimizer(False, threads, **sgd)
        fused, fused_kernels, fused_optimizer = train_with_optimizer(True, threads, **sgd)
    finally:
        torch.set_num_threads(threads_before)
    assert all(FUSED_UPDATE in kernels.values() for kernels in fused_kernels)
    assert all(FUSED_UPDATE not in kernels.values() for kernels in plain_kernels)
    for (name, expected), actual in zip(
        plain.state_dict().items(), fused.state_dict().values(), strict=True
    ):
        assert torch.equal(actual, expected), name
    for expected, actual in zip(plain.parameters(), fused.parameters(), strict=True):
        buffer = fused_optimizer.state[actual]["momentum_buffer"]
        assert torch.equal(buffer, plain_optimizer.state[expected]["momentum_buffer"])


def train_with_optimizer(fused: bool, threads: int, steps: int = 5, **sgd):
    """:func:`train` of topk with the native kernels only (no dense fallback), returning the
    optimizer too."""
    torch.set_num_threads(threads)
    model = tinyprop.apply(mlp(), tinyprop.TinyPropConfig(policy="topk", ratio=0.1))
    optimizer = torch.optim.SGD(model.parameters(), **{"lr": 0.05, **sgd})
    generator = torch.Generator().manual_seed(2)
    kernels = []
    for _ in range(steps):
        x = torch.randn(3, 20, generator=generator)
        y = torch.randint(0, 5, (3,), generator=generator)
        stats = tinyprop.train_step(
            model, x, y, nn.CrossEntropyLoss(reduction="none"), optimizer, fused_update=fused
        )
        kernels.append({name: kernel for name, kernel in stats.kernels.items() if name != "4"})
    return model, kernels, optimizer


def test_other_optimizers_step_as_usual_with_a_warning():
    plain, _ = train("topk", fused=False, momentum=0.9, weight_decay=1e-3)
    with pytest.warns(UserWarning, match="fused_update=True fuses the update of torch.optim.SGD"):
        fused, kernels = train("topk", fused=True, momentum=0.9, weight_decay=1e-3)
    assert all(NATIVE_SPARSE in k.values() and FUSED_UPDATE not in k.values() for k in kernels)
    for expected, actual in zip(plain.parameters(), fused.parameters(), strict=True):
        assert torch.equal(actual, expected)


def test_a_refused_step_applies_no_fused_update():
    """A NaN found after the backward (here in a dense parameter's gradient) refuses the step:
    the deferred weight updates are dropped with it."""

    class NanGain(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.ones(96))

        def forward(self, x):
            return x * torch.sqrt(self.gain)  # gain 0: infinite gradient

    torch.manual_seed(0)
    model = tinyprop.apply(  # the gain's vector is dense by design, without a warning
        nn.Sequential(nn.Linear(20, 96), NanGain(), nn.Linear(96, 96), nn.Linear(96, 5)),
        tinyprop.TinyPropConfig(policy="topk", ratio=0.1),
    )
    with torch.no_grad():
        model[1].gain[0] = 0.0
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(FloatingPointError, match="parameter gradient is NaN or infinite"):
        tinyprop.train_step(
            model, torch.randn(3, 20), torch.zeros(3, dtype=torch.long),
            nn.CrossEntropyLoss(reduction="none"), optimizer, fused_update=True,
        )  # fmt: skip
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_native_update_is_sgds_step_on_the_native_gradient(threads):
    """The update kernel sums each gradient row as linear_backward does: SGD's weights (to
    float rounding: whether ``w + (-lr) · g`` is one fused multiply-add can differ), at any
    thread count; rows nobody kept stay exactly as they are."""
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(threads)
        x = torch.randn(16, 300, generator=generator)
        weight = torch.randn(200, 300, generator=generator)
        keep = torch.randint(1, 12, (16,), generator=generator)
        _, column, value = tinyprop.native.topk(torch.randn(16, 200, generator=generator), keep)
        row_start = torch.cat([torch.zeros(1, dtype=torch.long), keep.cumsum(0)])
        _, grad = tinyprop.native.linear_backward(x, weight, row_start, column, value, False, True)
        parameter = nn.Parameter(weight.clone())
        parameter.grad = grad
        torch.optim.SGD([parameter], lr=0.3).step()
        updated = weight.clone()
        tinyprop.native.linear_update(x, updated, row_start, column, value, -0.3)
    finally:
        torch.set_num_threads(threads_before)
    torch.testing.assert_close(updated, parameter.detach(), rtol=1e-6, atol=1e-6)
    untouched = (grad == 0).all(1)  # (200,) rows nobody kept
    assert untouched.any() and torch.equal(updated[untouched], weight[untouched])


@pytest.mark.parametrize("threads", [1, 2, 4])
@pytest.mark.parametrize("sgd", ["plain", "momentum", "first", "nesterov"])
@pytest.mark.parametrize("relu_mask", [False, True])
def test_one_walk_gives_the_input_gradient_and_the_update_of_two_calls(threads, sgd, relu_mask):
    """linear_input_update walks the weight's rows once for the input gradient and SGD's step:
    the input gradient of the weight before the step and the weight (and momentum buffer) of
    the update, bit for bit as linear_backward then linear_update give them, at any thread
    count; widths that end in part of a tile, a sample that kept nothing."""
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(threads)
        x = torch.randn(9, 300, generator=generator).relu()  # (B, in) a ReLU's output
        weight = torch.randn(150, 300, generator=generator)  # (out, in)
        keep = torch.randint(1, 12, (9,), generator=generator)
        _, column, value = tinyprop.native.topk(torch.randn(9, 150, generator=generator), keep)
        ends = keep.cumsum(0).tolist()
        kept = torch.ones(column.numel(), dtype=torch.bool)
        kept[ends[3] : ends[4]] = False  # sample 4 kept nothing
        column, value, keep[4] = column[kept], value[kept], 0
        row_start = torch.cat([torch.zeros(1, dtype=torch.long), keep.cumsum(0)])  # (B + 1,)
        settings = {
            "plain": {},
            "momentum": {"momentum": 0.9, "dampening": 0.25},
            "first": {"momentum": 0.9, "first": True},
            "nesterov": {"momentum": 0.9, "nesterov": True},
        }[sgd]
        buffers = [torch.randn(150, 300, generator=generator) if settings else None]
        buffers.append(None if buffers[0] is None else buffers[0].clone())
        updated = [weight.clone(), weight.clone()]
        entries = (row_start, column, value)
        expected, _ = tinyprop.native.linear_backward(x, weight, *entries, True, False, relu_mask)
        tinyprop.native.linear_update(x, updated[0], *entries, -0.3, buffers[0], **settings)
        walked = tinyprop.native.linear_input_update(
            x, updated[1], *entries, -0.3, buffers[1], **settings, relu_mask=relu_mask
        )
    finally:
        torch.set_num_threads(threads_before)
    assert torch.equal(walked, expected)
    assert torch.equal(updated[1], updated[0]) and not torch.equal(updated[1], weight)
    assert buffers[0] is None or torch.equal(buffers[1], buffers[0])


class SharedWeights(nn.Module):
    """A Linear weight used twice: the layer called twice, two layers tied to it, or the
    layer and an ``F.linear`` of its weight."""

    def __init__(self, kind: str):
        super().__init__()
        torch.manual_seed(0)
        self.kind, self.first, self.head = kind, nn.Linear(16, 16), nn.Linear(16, 3)
        self.second = nn.Linear(16, 16) if kind == "tied" else self.first
        self.second.weight = self.first.weight

    def forward(self, x):
        hidden = torch.relu(self.first(x))
        if self.kind == "functional":
            return self.head(hidden + nn.functional.linear(hidden, self.first.weight))
        return self.head(torch.relu(self.second(hidden)))


@pytest.mark.parametrize("kind", ["called-twice", "tied", "functional"])
@pytest.mark.parametrize("policy", ["topk", "tinypropv2"])
def test_a_weight_of_two_calls_steps_as_sgd_with_momentum(policy, kind):
    """A weight used twice in a step (one Linear called twice, tied weights, an ``F.linear``
    of it) had its sparse call's update fused and the other use's gradient stepped by the
    optimizer: with momentum that step took the buffer the fused update had just written
    (SGD's buffer then held momentum · g_1 + g_2 + g_1 after the first step), 1e-2 off after
    4 steps, silently. Such a weight now steps through the optimizer: SGD's weights and
    buffers."""
    models, optimizers = [], []
    for fused in (False, True):
        model = tinyprop.apply(SharedWeights(kind), tinyprop.TinyPropConfig(policy, ratio=0.3))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        generator = torch.Generator().manual_seed(1)
        for _ in range(4):
            x = torch.randn(16, 16, generator=generator)
            y = torch.randint(0, 3, (16,), generator=generator)
            loss_fn = nn.CrossEntropyLoss(reduction="none")
            tinyprop.train_step(model, x, y, loss_fn, optimizer, fused_update=fused)
        models.append(model)
        optimizers.append(optimizer)
    (plain, fused), (plain_optimizer, fused_optimizer) = models, optimizers
    for (name, expected), actual in zip(plain.named_parameters(), fused.parameters(), strict=True):
        assert torch.equal(actual, expected), name
        buffer = fused_optimizer.state[actual]["momentum_buffer"]
        assert torch.equal(buffer, plain_optimizer.state[expected]["momentum_buffer"]), name
