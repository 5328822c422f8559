"""train_step(fused_update=True): SGD's update of the sparse Linear weights from the kept
entries, without a weight gradient, gives the weights torch.optim.SGD gives."""

from __future__ import annotations

import contextlib
import copy
from unittest import mock

import pytest
import torch
from torch import nn

import tinyprop
import tinyprop.native
from tinyprop import fused_walk, graph_free
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


@contextlib.contextmanager
def counted_walks():
    """The number of one-walk calls (native.linear_input_update) inside the block."""
    walks = []
    original = tinyprop.native.linear_input_update

    def counting(*arguments, **keywords):
        walks.append(1)
        return original(*arguments, **keywords)

    with mock.patch.object(tinyprop.native, "linear_input_update", counting):
        yield walks


def walk_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(20, 96), nn.ReLU(), nn.Linear(96, 96), nn.ReLU(), nn.Dropout(0.0),
        nn.Linear(96, 96), nn.ReLU(), nn.Linear(96, 5),
    )  # fmt: skip


def fused_run(way: str, model: nn.Module, sgd: dict, batches: list):
    """train_step(fused_update=True) over ``batches``: the library's step (``walk``), the
    graph-free step with the proof off (``deferred``) or the autograd step (``autograd``);
    the model, optimizer and the number of walks."""
    model = tinyprop.apply(copy.deepcopy(model), tinyprop.TinyPropConfig(policy="topk", ratio=0.1))
    optimizer = torch.optim.SGD(model.parameters(), **{"lr": 0.05, **sgd})
    patch = contextlib.nullcontext()
    if way == "deferred":
        patch = mock.patch.object(fused_walk, "prove", return_value=None)
    elif way == "autograd":
        patch = mock.patch.object(graph_free, "eligible", return_value=False)
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    with patch, counted_walks() as walks:
        for x, y in batches:
            tinyprop.train_step(model, x, y, loss_fn, optimizer, fused_update=True)
    return model, optimizer, len(walks)


def walk_batches(count: int = 5, scale: float = 1.0) -> list:
    generator = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(count):
        x = scale * torch.randn(8, 20, generator=generator)
        batches.append((x, torch.randint(0, 5, (8,), generator=generator)))
    return batches


def assert_same_state(a, b) -> None:
    """Weights and momentum buffers bit for bit."""
    (model_a, optimizer_a), (model_b, optimizer_b) = a, b
    for (name, p), q in zip(model_a.named_parameters(), model_b.parameters(), strict=True):
        assert torch.equal(p, q), name
        buffers = [
            optimizer.state[r].get("momentum_buffer")
            for optimizer, r in ((optimizer_a, p), (optimizer_b, q))
        ]
        assert (buffers[0] is None) == (buffers[1] is None), name
        assert buffers[0] is None or torch.equal(*buffers), name


@pytest.mark.parametrize(
    "sgd", [{}, *SGD_WITH_MOMENTUM], ids=["plain", "momentum", "dampening", "nesterov"]
)
@pytest.mark.parametrize("threads", [1, 2])
def test_a_proven_step_walks_and_steps_as_the_deferred_update_bit_for_bit(sgd, threads):
    """A graph-free fused step proven accepted steps each fused hidden layer in its input
    gradient's walk (tinyprop.fused_walk): the same weights and momentum buffers bit for bit
    as the deferred update, graph-free or through autograd (before: no walk). With momentum
    only when switched on (its walk measured slower than the deferred update)."""
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with mock.patch.object(fused_walk, "WALKS_WITH_MOMENTUM", True):
            batches = walk_batches()
            runs = {
                way: fused_run(way, walk_mlp(), sgd, batches)
                for way in ("walk", "deferred", "autograd")
            }
        default = fused_run("walk", walk_mlp(), sgd, batches)  # WALKS_WITH_MOMENTUM False
    finally:
        torch.set_num_threads(threads_before)
    assert runs["walk"][2] == 3 * len(batches)  # the three layers with an input gradient
    assert default[2] == (0 if sgd.get("momentum") else 3 * len(batches))
    assert_same_state(default[:2], runs["deferred"][:2])
    assert runs["deferred"][2] == runs["autograd"][2] == 0
    for way in ("deferred", "autograd"):
        assert_same_state(runs["walk"][:2], runs[way][:2])


@mock.patch.object(fused_walk, "WALKS_WITH_MOMENTUM", True)  # its walk, kept tested
def test_an_overflow_below_a_walking_layer_refuses_the_step_untouched():
    """After steps that walked, a weight column of 1e30 under an input of 1e10 (changed in
    place through PyTorch, a new version): the first layer's weight gradient overflows to
    inf while the forward, the loss and δ above stay finite. The bound fails, nothing walks,
    and the refused step leaves every weight and momentum buffer as it was (a walk taken on
    the bound kept from before the change fails this)."""
    model = tinyprop.apply(walk_mlp(), tinyprop.TinyPropConfig(policy="topk", ratio=0.1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    with counted_walks() as walks:
        for x, y in walk_batches(2):
            tinyprop.train_step(model, x, y, loss_fn, optimizer, fused_update=True)
    assert len(walks) == 6
    with torch.no_grad():  # unit 0 of the first hidden layer: 1e-20 after its ReLU
        model[0].weight[0] = 0.0
        model[0].bias[0] = 1e-20
        model[2].weight[:, 0] = 1e30  # δ at that unit about 1e29, times x of 1e10
    before = copy.deepcopy(model.state_dict())
    buffers = {
        name: optimizer.state[p]["momentum_buffer"].clone() for name, p in model.named_parameters()
    }
    x, y = walk_batches(1, scale=1e10)[0]
    with counted_walks() as walks, pytest.raises(FloatingPointError, match="NaN or infinite"):
        tinyprop.train_step(model, x, y, loss_fn, optimizer, fused_update=True)
    assert not walks
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
        assert torch.equal(optimizer.state[p]["momentum_buffer"], buffers[name]), name


@mock.patch.object(fused_walk, "WALKS_WITH_MOMENTUM", True)  # its walk, kept tested
def test_huge_weights_that_fail_the_bound_step_as_the_deferred_update():
    """A weight entry of 1e36 on a unit its ReLU keeps off: every gradient stays finite, but
    the bound (96 inputs x 1e36 x Σ |δ|) does not hold: no walk, the deferred update's
    weights bit for bit, and the step is not refused."""
    model = walk_mlp()
    with torch.no_grad():
        model[0].weight[0] = 0.0
        model[0].bias[0] = -1.0  # unit 0 is off for every input
        model[2].weight[:, 0] = 1e36
    batches = walk_batches(3)
    walked = fused_run("walk", model, {"momentum": 0.9}, batches)
    deferred = fused_run("deferred", model, {"momentum": 0.9}, batches)
    assert walked[2] == 0
    assert_same_state(walked[:2], deferred[:2])
    assert not torch.equal(walked[0][2].weight, model[2].weight)  # it stepped


@mock.patch.object(fused_walk, "WALKS_WITH_MOMENTUM", True)  # its walk, kept tested
def test_the_kept_bound_stays_above_the_weight_as_walks_step_it():
    """The bound on max |W| kept for each walked weight is advanced by lr times a bound on
    the step (no read of the weight): after steps at a large learning rate it is still at
    least max |W| (and max |buffer|), and an in-place change through PyTorch is read again."""
    model = tinyprop.apply(walk_mlp(), tinyprop.TinyPropConfig(policy="topk", ratio=0.1))
    optimizer = torch.optim.SGD(model.parameters(), lr=2.0, momentum=0.9, nesterov=True)
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    with counted_walks() as walks:
        for x, y in walk_batches(6):
            tinyprop.train_step(model, x, y, loss_fn, optimizer, fused_update=True)
    assert len(walks) == 18
    bounds = fused_walk._BOUNDS[model]
    for layer in (model[2], model[5], model[7]):
        buffer = optimizer.state[layer.weight]["momentum_buffer"]
        for tensor in (layer.weight, buffer):
            kept = bounds[id(tensor)]
            assert not kept[3]  # advanced, not read
            assert kept[2] >= fused_walk.largest(tensor) > 0
    with torch.no_grad():
        model[2].weight.mul_(1e3)
    assert fused_walk.bound(bounds, model[2].weight) == fused_walk.largest(model[2].weight)


def test_a_step_where_no_weight_would_walk_reads_no_bound():
    """SGD with momentum does not walk (slower than its deferred update): the step proves
    nothing either, since each deferred update counts a version and the proof would read every
    weight's max |W| again, every step, for nothing."""
    model = tinyprop.apply(walk_mlp(), tinyprop.TinyPropConfig(policy="topk", ratio=0.1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    reads = []
    largest = fused_walk.largest
    with mock.patch.object(fused_walk, "largest", lambda t: reads.append(t.shape) or largest(t)):
        with counted_walks() as walks:
            for x, y in walk_batches(3):
                tinyprop.train_step(model, x, y, loss_fn, optimizer, fused_update=True)
    assert len(walks) == 0
    assert reads == []
