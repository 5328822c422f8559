"""train_step without an autograd graph (tinyprop.graph_free) on a plain nn.Sequential: the
same skips, k, kernels, ledger, StepStats, weights, running state and optimizer state as the
autograd path, bit for bit; everything it does not take runs the autograd path."""

from __future__ import annotations

import contextlib
import copy
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from torch import nn

import tinyprop
from tinyprop import graph_free

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

cross_entropy = nn.CrossEntropyLoss(reduction="none")


def autograd_step(model, x, y, loss_fn, optimizer):
    """train_step with the graph-free step turned off (the autograd path)."""
    with mock.patch.object(graph_free, "eligible", return_value=False):
        return tinyprop.train_step(model, x, y, loss_fn, optimizer)


@contextlib.contextmanager
def run_steps_returned():
    """The list of what each call of graph_free.run_step returned inside the block (None: it
    handed the step to the autograd path)."""
    returned = []
    original = graph_free.run_step

    def run_step(*args):
        returned.append(original(*args))
        return returned[-1]

    with mock.patch.object(graph_free, "run_step", run_step):
        yield returned


def graph_free_step(model, x, y, loss_fn, optimizer, expected=True):
    """train_step, checking whether the graph-free step ran it (``expected``; not when it was
    tried and handed the step to the autograd path)."""
    with run_steps_returned() as returned:
        stats = tinyprop.train_step(model, x, y, loss_fn, optimizer)
    assert (len(returned) == 1 and returned[0] is not None) == expected
    return stats


def fields(stats):
    return (
        stats.loss, stats.trained, stats.skipped, stats.stepped, stats.macs, stats.kernels,
        list(stats.keep), stats.trained_mask.tolist(),
    )  # fmt: skip


def assert_same_runs(model, config, batches, loss_fn, make_optimizer, expected=True):
    """Both paths over ``batches`` from the same start: every step's stats, then weights,
    running state and optimizer state, bit for bit."""
    models = [tinyprop.apply(copy.deepcopy(model), config) for _ in range(2)]
    optimizers = [make_optimizer(copy) for copy in models]
    steps = []
    for x, y in batches:
        a = autograd_step(models[0], x, y, loss_fn, optimizers[0])
        b = graph_free_step(models[1], x, y, loss_fn, optimizers[1], expected)
        steps.append(b)
        assert fields(a) == fields(b)
        assert all(torch.equal(a.keep[name], b.keep[name]) for name in a.keep)
    states = [copy.state_dict() for copy in models]
    for key in states[0]:  # (an empty score window holds NaN)
        torch.testing.assert_close(states[0][key], states[1][key], rtol=0, atol=0, equal_nan=True)
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        state = optimizers[0].state[a]
        assert state.keys() == optimizers[1].state[b].keys()
        assert all(torch.equal(state[key], optimizers[1].state[b][key]) for key in state)
    return steps


@pytest.fixture(params=[1, 2], ids=["1 thread", "2 threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("dataset", ["har", "mnist"])
def test_finetune_runs_are_the_autograd_path_bit_for_bit(dataset, threads):
    from speed_floor import finetune_workload

    workload = finetune_workload(dataset)
    batches = workload["batches"] if dataset == "har" else workload["batches"][:300]
    assert_same_runs(
        workload["model"], workload["policy"][1], batches, workload["loss"], workload["optimizer"]
    )


def mlp():
    return nn.Sequential(
        nn.Flatten(), nn.Linear(12, 32), nn.ReLU(), nn.Dropout(0.0), nn.Linear(32, 16),
        nn.ReLU(), nn.Linear(16, 5),
    )  # fmt: skip


def cnn1d():
    return nn.Sequential(
        nn.Conv1d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool1d(2), nn.Conv1d(8, 40, 3),
        nn.ReLU(), nn.AvgPool1d(3), nn.Flatten(), nn.Linear(40, 5, bias=False),
    )  # fmt: skip


def cnn2d():
    return nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Identity(),
        nn.Linear(6 * 36, 5),
    )  # fmt: skip


MODELS = {"mlp": (mlp, (12,)), "cnn1d": (cnn1d, (3, 14)), "cnn2d": (cnn2d, (2, 6, 6))}
POLICIES = {
    "topk": {"policy": "topk", "ratio": 0.1},
    "randomk": {"policy": "randomk", "ratio": 0.2},
    "tinyprop": {"policy": "tinyprop"},
    "tinypropv2": {"policy": "tinypropv2", "skip_threshold": 0.3},
    "unified": {"policy": "topk", "ratio": 0.1, "unified": True},
    "budget": {"policy": "tinypropv2", "budget": 0.2},
    "mean over trained": {"policy": "tinypropv2", "mean_over_trained": True},
}


def batches(shape, batch, count=6, classes=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, *shape, generator=generator),
         torch.randint(0, classes, (batch,), generator=generator))
        for _ in range(count)
    ]  # fmt: skip


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("name", list(MODELS))
def test_small_models_with_each_policy(name, policy):
    make, shape = MODELS[name]
    torch.manual_seed(0)
    config = tinyprop.TinyPropConfig(seed=0, **POLICIES[policy])
    adam = lambda model: torch.optim.Adam(model.parameters(), lr=0.01)  # noqa: E731
    assert_same_runs(make(), config, batches(shape, 16), cross_entropy, adam)


def test_full_policy_takes_the_autograd_path():
    torch.manual_seed(0)
    sgd = lambda model: torch.optim.SGD(model.parameters(), lr=0.1)  # noqa: E731
    config = tinyprop.TinyPropConfig(policy="full")
    assert_same_runs(mlp(), config, batches((12,), 8), cross_entropy, sgd, expected=False)


def squared_error(output, y):
    """A loss that is not cross-entropy: autograd differentiates it at the leaf output."""
    target = nn.functional.one_hot(y, output.shape[1]).to(output.dtype)
    return ((output - target) ** 2).mean(1)


@pytest.mark.parametrize("batch", [6, 16])  # δ_L by autograd, or from the decision's gradient
@pytest.mark.parametrize("loss_fn", [cross_entropy, squared_error], ids=["ce", "mse"])
def test_any_loss_frozen_layers_and_batch_sizes(loss_fn, batch):
    torch.manual_seed(1)
    model = mlp()
    model[1].requires_grad_(False)  # a frozen first layer: no input gradient below layer 4
    model[4].bias.requires_grad_(False)
    config = tinyprop.TinyPropConfig(policy="tinypropv2", skip_threshold=0.2)
    sgd = lambda model: torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # noqa: E731
    assert_same_runs(model, config, batches((12,), batch), loss_fn, sgd)


def test_every_sample_skipped_and_no_optimizer_step():
    torch.manual_seed(0)
    config = tinyprop.TinyPropConfig(policy="tinypropv2", skip_threshold=1.0)  # D = 1: Ymax_L
    adam = lambda model: torch.optim.Adam(model.parameters(), lr=0.001)  # noqa: E731
    steps = assert_same_runs(mlp(), config, batches((12,), 8, count=1) * 4, cross_entropy, adam)
    assert 0 in [stats.trained for stats in steps]
    assert not all(stats.stepped for stats in steps)


@pytest.mark.parametrize("native", [True, False], ids=["native kernels", "PyTorch's"])
@pytest.mark.parametrize("name", ["cnn1d", "cnn2d"])
def test_a_step_skipping_samples_backpropagates_the_trained_rows_alone(name, native):
    """The ReLU's, the pools' and the sparse layers' backward see the trained samples' rows
    only (a skipped sample's δ is zero all the way down), with the same results bit for bit
    (a convolution's geometry on those rows; PyTorch's sparse kernels scatter into it)."""
    make, shape = MODELS[name]
    torch.manual_seed(0)
    settings = {"skip_threshold": 0.9, "s_min": 0.01, "s_max": 0.01}  # PyTorch's: k / N < 0.02
    config = tinyprop.TinyPropConfig(policy="tinypropv2", **settings)
    sgd = lambda model: torch.optim.SGD(model.parameters(), lr=0.1)  # noqa: E731
    rows, original = [], graph_free._layer_backward

    def layer_backward(layer, call, x, delta, fused_relu=False):
        rows.append((x.shape[0], delta.shape[0]))
        return original(layer, call, x, delta, fused_relu)

    with contextlib.ExitStack() as stack:
        if not native:
            stack.enter_context(
                mock.patch.object(tinyprop.native, "can_backward", return_value=False)
            )
        stack.enter_context(mock.patch.object(graph_free, "_layer_backward", layer_backward))
        large = [(10 * x, y) for x, y in batches(shape, 16)]  # confident outputs: Y_L differ
        steps = assert_same_runs(make(), config, large, cross_entropy, sgd)
    trained = [stats.trained for stats in steps if stats.trained]
    assert any(0 < count < 16 for count in trained)  # some steps skip some samples
    layers = len(rows) // len(trained)  # every sparse layer of every step that trains
    assert rows == [(count, count) for count in trained for _ in range(layers)]


def coupled(output, y):
    """Cross-entropy plus a term coupling the samples (their spread around the batch's mean):
    a skipped sample's output gets a gradient from the trained samples' losses."""
    return cross_entropy(output, y) + 0.1 * (output - output.mean(0)).pow(2).sum(1)


def test_a_loss_coupling_the_samples_backpropagates_the_skipped_rows_too():
    torch.manual_seed(0)
    config = tinyprop.TinyPropConfig(policy="tinypropv2", skip_threshold=0.9)
    sgd = lambda model: torch.optim.SGD(model.parameters(), lr=0.1)  # noqa: E731
    large = [(10 * x, y) for x, y in batches((3, 14), 16)]  # confident outputs: Y_L differ
    steps = assert_same_runs(cnn1d(), config, large, coupled, sgd)
    assert any(0 < stats.trained < 16 for stats in steps)


def hooked(model):
    model[1].register_forward_hook(lambda module, args, output: None)
    return model


def double(model):
    return model.double()


def training_dropout(model):
    model[3].p = 0.5
    return model


def with_tanh(model):
    model[2] = nn.Tanh()
    return model


def in_a_module(model):
    return nn.Sequential(model)


def parameter_hook(model):
    model[1].weight.register_hook(lambda grad: grad)
    return model


def bias_alone(model):
    model[1].weight.requires_grad_(False)  # the first layer's bias trains, densely
    return model


INELIGIBLE = {
    "bias alone trains": bias_alone,
    "forward hook": hooked,
    "float64": double,
    "dropout in training": training_dropout,
    "other module": with_tanh,
    "nested sequential": in_a_module,
    "parameter hook": parameter_hook,
}


@pytest.mark.parametrize("reason", list(INELIGIBLE))
def test_ineligible_models_take_the_autograd_path(reason):
    torch.manual_seed(0)
    model = INELIGIBLE[reason](mlp())
    dtype = next(model.parameters()).dtype
    applied = tinyprop.apply(model, tinyprop.TinyPropConfig(policy="tinypropv2"))
    optimizer = torch.optim.SGD(applied.parameters(), lr=0.1)
    x, y = batches((12,), 8, count=1)[0]
    graph_free_step(applied, x.to(dtype), y, cross_entropy, optimizer, expected=False)


def twice_or_tied(tied: bool) -> nn.Sequential:
    first, second = nn.Linear(16, 16), nn.Linear(16, 16)
    if tied:
        second.weight = first.weight
    else:
        second = first  # one module called twice
    return nn.Sequential(
        nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), first, nn.ReLU(), second, nn.ReLU(),
        nn.Linear(16, 5),
    )  # fmt: skip


@pytest.mark.parametrize("tied", [False, True], ids=["a layer twice", "tied weights"])
def test_a_layer_twice_or_tied_weights_take_the_autograd_path(tied):
    """The gradients of a weight two calls use add up; the graph-free step set each call's
    as the weight's gradient, the last one winning (0.004-0.006 off after one step)."""
    torch.manual_seed(0)
    config = tinyprop.TinyPropConfig(policy="topk", ratio=0.5)
    assert_same_runs(
        twice_or_tied(tied), config, batches((12,), 8, count=3), cross_entropy,
        lambda model: torch.optim.SGD(model.parameters(), lr=0.1), expected=False,
    )  # fmt: skip


def test_ineligible_steps_take_the_autograd_path():
    torch.manual_seed(0)
    model = tinyprop.apply(mlp(), tinyprop.TinyPropConfig(policy="tinypropv2"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = batches((12,), 8, count=1)[0]
    graph_free_step(model, x, y, cross_entropy, optimizer)
    graph_free_step(model, x.requires_grad_(), y, cross_entropy, optimizer, expected=False)
    x = x.detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        graph_free_step(model, x, y, cross_entropy, optimizer, expected=False)
    handle = nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        graph_free_step(model, x, y, cross_entropy, optimizer, expected=False)
    finally:
        handle.remove()
    with mock.patch.object(graph_free, "run_step", wraps=graph_free.run_step) as run:
        tinyprop.train_step(model, x, y, cross_entropy, optimizer, fused_update=True)
    assert run.call_count == 1  # the fused update too (tinyprop.fused_walk)
    model.load_state_dict(model.state_dict())  # a loaded Ymax_L is checked by the autograd path
    graph_free_step(model, x, y, cross_entropy, optimizer, expected=False)
    graph_free_step(model, x, y, cross_entropy, optimizer)


def forward_hook(model):
    return model[1].register_forward_hook(lambda module, args, output: None).remove


def parameter_hook_after_apply(model):
    return model[0].weight.register_hook(lambda grad: grad).remove


def overlapping_pool(model):
    pool = model[2]
    pool.stride = 1  # overlapping windows: ineligible
    return lambda: setattr(pool, "stride", 2)


def replaced_layer(model):
    model[3] = nn.Conv1d(8, 40, 3)  # plain, made sparse by the next forward with gradients
    return None


def retyped_parameter(model):
    weight = model[0].weight
    weight.data = weight.data.double()  # no registration: the parameter's dtype alone
    return lambda: setattr(weight, "data", weight.data.float())


def frozen_weight(model):
    model[0].weight.requires_grad_(False)  # the first layer's bias trains alone: dense
    return lambda: model[0].weight.requires_grad_(True)


def dropout_trains(model):
    model.insert(3, nn.Dropout(0.5))  # (a module change too)
    model.eval()  # p > 0 in eval mode: eligible
    return model.train


# change of an applied CNN whose steps ran graph-free -> (it, whether eligible after it); each
# returns what undoes it (None: a change undone by the next forward)
CHANGES_AFTER_STEPS = {
    "a forward hook added": (forward_hook, False),
    "a parameter hook added": (parameter_hook_after_apply, False),
    "a module replaced": (replaced_layer, False),
    "a pool's stride changed": (overlapping_pool, False),
    "a parameter's dtype changed": (retyped_parameter, False),
    "a weight frozen": (frozen_weight, False),
    "dropout in eval mode, then training": (dropout_trains, True),
}


@pytest.mark.parametrize("change", list(CHANGES_AFTER_STEPS))
def test_eligibility_follows_changes_after_steps(change):
    """graph_free.eligible keeps its walk over the modules per model until something it reads
    changes: after steps that ran graph-free, each change takes the next step to the autograd
    path (or back), and undoing it brings the graph-free step back."""
    torch.manual_seed(0)
    model = tinyprop.apply(cnn1d(), tinyprop.TinyPropConfig(policy="tinypropv2"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = batches((3, 14), 8, count=1)[0]
    for _ in range(2):
        graph_free_step(model, x, y, cross_entropy, optimizer)
    make, eligible_after = CHANGES_AFTER_STEPS[change]
    undo = make(model)
    assert graph_free.eligible(model, x) is eligible_after
    if undo is not None:
        undo()
        assert graph_free.eligible(model, x) is not eligible_after
    else:  # the autograd path's forward made the new layer sparse: graph-free from then on
        graph_free_step(model, x, y, cross_entropy, optimizer, expected=False)
        graph_free_step(model, x, y, cross_entropy, optimizer)


@pytest.mark.parametrize("reads", ["weights", "a learnt temperature"])
def test_a_loss_reading_other_tensors_takes_the_autograd_path(reads):
    """A loss with a penalty on the weights (or a temperature that trains) sends gradients
    past y_L; the graph-free step differentiated the loss at y_L alone and dropped them (the
    weights 0.03-0.04 off after one step)."""
    torch.manual_seed(0)
    models = [tinyprop.apply(mlp(), tinyprop.TinyPropConfig(policy="topk", ratio=0.5))]
    models.append(copy.deepcopy(models[0]))
    temperature = [torch.ones(1, requires_grad=True) for _ in models]
    optimizers = [
        torch.optim.SGD([*model.parameters(), weight], lr=0.1)
        for model, weight in zip(models, temperature, strict=True)
    ]

    def loss_for(model, weight):
        def loss_fn(output, target):
            if reads == "weights":
                return cross_entropy(output, target) + 0.5 * sum(
                    (p**2).sum() for p in model.parameters()
                )
            return cross_entropy(output / weight, target)

        return loss_fn

    with run_steps_returned() as returned:
        for x, y in batches((12,), 8, count=3):
            autograd_step(models[0], x, y, loss_for(models[0], temperature[0]), optimizers[0])
            tinyprop.train_step(models[1], x, y, loss_for(models[1], temperature[1]), optimizers[1])
    assert returned == [None] * 3  # tried, and left to the autograd path
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(temperature[0], temperature[1])
    if reads == "a learnt temperature":
        assert not torch.equal(temperature[0], torch.ones(1))


def test_a_pool_sized_by_a_tuple_of_one():
    """nn.MaxPool1d((2,)) keeps the tuple; the graph-free step passed it on as a size."""
    torch.manual_seed(0)
    model = cnn1d()
    model[2] = nn.MaxPool1d((2,))
    config = tinyprop.TinyPropConfig(policy="tinypropv2")
    adam = lambda model: torch.optim.Adam(model.parameters(), lr=0.01)  # noqa: E731
    assert_same_runs(model, config, batches((3, 14), 8, count=3), cross_entropy, adam)


def test_a_loss_changing_the_output_in_place_takes_the_autograd_path():
    """In place on y_L, a leaf there, PyTorch refuses; the autograd path runs the loss on the
    layer's output, where it works."""
    torch.manual_seed(0)

    def masked(output, target):
        output[:, 0] = output[:, 0] - 1.0
        return cross_entropy(output, target)

    config = tinyprop.TinyPropConfig(policy="topk", ratio=0.5)
    sgd = lambda model: torch.optim.SGD(model.parameters(), lr=0.1)  # noqa: E731
    models = [tinyprop.apply(mlp(), config)]
    models.append(copy.deepcopy(models[0]))
    optimizers = [sgd(model) for model in models]
    for x, y in batches((12,), 8, count=3):
        autograd_step(models[0], x, y, masked, optimizers[0])
        tinyprop.train_step(models[1], x, y, masked, optimizers[1])
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(a, b)


def _ignored(batch):  # labels with ignore_index rows (-100)
    x, y = batch
    return x, torch.where(torch.arange(len(y)) % 3 == 0, -100, y)


def _soft(batch):  # probability targets
    x, y = batch
    return x, nn.functional.one_hot(y, 5).float() * 0.9 + 0.02


def _channels_last(model):
    return model.to(memory_format=torch.channels_last)


def _strided_convs():
    return nn.Sequential(
        nn.Conv1d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv1d(8, 8, 3, groups=4, padding="same", dilation=2), nn.ReLU(),
        nn.AvgPool1d(2, ceil_mode=True, count_include_pad=False, padding=1), nn.Flatten(),
        nn.Linear(8 * 5, 5),
    )  # fmt: skip


USERS_BRING = {  # name: (model, input shape, loss, batch transform)
    "linear on (B, T, F)": (
        lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Flatten(), nn.Linear(40, 5)),
        (5, 6), cross_entropy, None,
    ),
    "channels-last conv": (lambda: _channels_last(cnn2d()), (2, 6, 6), cross_entropy, None),
    "ignore_index": (mlp, (12,), cross_entropy, _ignored),
    "probability targets": (mlp, (12,), cross_entropy, _soft),
    "label smoothing": (
        mlp, (12,), nn.CrossEntropyLoss(reduction="none", label_smoothing=0.1), None,
    ),
    "strided, grouped, dilated convs": (_strided_convs, (3, 16), cross_entropy, None),
}  # fmt: skip


@pytest.mark.parametrize("case", list(USERS_BRING))
def test_what_users_bring_equals_the_autograd_path(case):
    make, shape, loss_fn, transform = USERS_BRING[case]
    torch.manual_seed(0)
    data = batches(shape, 8, count=4)
    data = data if transform is None else [transform(batch) for batch in data]
    config = tinyprop.TinyPropConfig(policy="tinypropv2")
    sgd = lambda model: torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # noqa: E731
    assert_same_runs(make(), config, data, loss_fn, sgd)


def test_nan_loss_and_nan_delta_raise_before_any_update():
    torch.manual_seed(0)
    model = tinyprop.apply(mlp(), tinyprop.TinyPropConfig(policy="tinypropv2"))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = batches((12,), 8, count=1)[0]
    graph_free_step(model, x, y, cross_entropy, optimizer)
    before = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    broken = x.clone()
    broken[3] = float("nan")
    with pytest.raises(FloatingPointError, match=r"loss is NaN or infinite for samples \[3\]"):
        graph_free_step(model, broken, y, cross_entropy, optimizer)

    def distance(output, target):  # finite at 0, its gradient there NaN
        return torch.sqrt(((output - target) ** 2).sum(1))

    with torch.no_grad():
        target = model(x)
    target[:2] += 1.0  # samples 2.. at distance 0: their δ_L is NaN
    with pytest.raises(FloatingPointError, match="NaN or infinite"):
        graph_free_step(model, x, target, distance, optimizer)
    state = model.state_dict()
    assert all(torch.equal(state[key], before[0][key]) for key in state)
    assert all(parameter.grad is None for parameter in model.parameters())
    assert str(optimizer.state_dict()) == str(before[1])


def test_dropout_in_eval_mode_and_an_unbatched_layer_input():
    torch.manual_seed(0)
    model = training_dropout(mlp()).eval()  # Dropout(0.5) in eval mode: the identity
    config = tinyprop.TinyPropConfig(policy="tinypropv2")
    sgd = lambda model: torch.optim.SGD(model.parameters(), lr=0.1)  # noqa: E731
    assert_same_runs(model, config, batches((12,), 8, count=3), cross_entropy, sgd)
    # a sparse layer fed one unbatched sample: the forward is dropped, the autograd path runs
    flat = tinyprop.apply(nn.Sequential(nn.Flatten(0), nn.Linear(24, 5)), config)
    optimizer = torch.optim.SGD(flat.parameters(), lr=0.1)
    with run_steps_returned() as returned:
        with pytest.raises(ValueError, match="one output tensor"):
            tinyprop.train_step(flat, torch.randn(2, 12), torch.zeros(2), cross_entropy, optimizer)
    assert returned == [None]
    assert tinyprop.model.state_of(flat).open_pass is None
