"""Python threads: two applied models trained at once, and an evaluation under no_grad in
another thread while the training forward of the same model runs."""

import copy
import threading

import pytest
import torch
from core_models import batch, build
from torch import nn

import tinyprop
from tinyprop import graph_free

LOSS = nn.CrossEntropyLoss(reduction="none")
CONFIGS = [
    tinyprop.TinyPropConfig(policy="full"),
    tinyprop.TinyPropConfig(policy="topk", ratio=0.1),
    tinyprop.TinyPropConfig(policy="tinyprop"),
    tinyprop.TinyPropConfig(policy="tinypropv2"),
]


def train(model, name, steps, seed=0, before_each=None, dtype=torch.float64) -> list:
    """``steps`` SGD steps through tinyprop.train_step; what each step trained and counted."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    done = []
    for step in range(steps):
        if before_each is not None:
            before_each()
        x, y = batch(name, size=8, seed=seed * 100 + step, dtype=dtype)
        stats = tinyprop.train_step(model, x, y, LOSS, optimizer)
        done.append((stats.trained_mask.tolist(), stats.macs))
    return done


def assert_same_state(got: nn.Module, expected: nn.Module) -> None:
    expected_state = expected.state_dict()
    for key, value in got.state_dict().items():
        assert torch.equal(value, expected_state[key]), key


@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda config: config.policy)
def test_an_evaluation_in_another_thread_during_the_training_forward_changes_nothing(name, config):
    """The evaluation runs (deterministically) while the training forward is between its
    first and second layer; the training equals a run evaluated between its steps in its own
    thread bit for bit, and so do the evaluation's outputs. It joined the training forward's
    record and closed it: other depths (another k), the wrong output for the skip decision,
    and "trying to pop from empty mode stack" in the evaluation."""
    model = tinyprop.apply(build(name), config)
    alone = copy.deepcopy(model)
    x_eval, _ = batch(name, size=5, seed=99)
    outputs, expected_outputs, errors = [], [], []

    def evaluate_alone():
        with torch.no_grad():
            expected_outputs.append(alone(x_eval))

    def evaluate():  # no_grad, then inference_mode, in turn
        try:
            with torch.inference_mode() if len(outputs) % 2 else torch.no_grad():
                outputs.append(model(x_eval))
        except Exception as error:  # noqa: BLE001 (reported by the assertion below)
            errors.append(error)

    def in_the_training_forward(module, args, output):
        if torch.is_grad_enabled():  # the training thread's forward, not the evaluation's
            evaluation = threading.Thread(target=evaluate)
            evaluation.start()
            evaluation.join()

    model[0].register_forward_hook(in_the_training_forward)
    assert train(model, name, 4) == train(alone, name, 4, before_each=evaluate_alone)
    assert errors == []
    assert len(outputs) == 4
    for got, expected in zip(outputs, expected_outputs, strict=True):
        assert torch.equal(got, expected)
    assert_same_state(model, alone)


@pytest.mark.parametrize("config", CONFIGS[1::2], ids=lambda config: config.policy)
def test_two_models_trained_in_two_threads_equal_them_trained_one_after_the_other(config):
    models = [tinyprop.apply(build(name), config) for name in ("mlp", "cnn")]
    alone = [copy.deepcopy(model) for model in models]
    names = ("mlp", "cnn")
    expected = [
        train(model, name, 3, seed)
        for seed, (model, name) in enumerate(zip(alone, names, strict=True))
    ]
    done = [None, None]

    def run(index, name):
        done[index] = train(models[index], name, 3, index)

    threads = [threading.Thread(target=run, args=(i, n)) for i, n in enumerate(names)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert done == expected
    for model, reference in zip(models, alone, strict=True):
        assert_same_state(model, reference)


class _Waits(nn.Module):
    """Holds its forward until released: a forward in the middle of its FLOP measurement."""

    def __init__(self) -> None:
        super().__init__()
        self.inside, self.release = threading.Event(), threading.Event()

    def forward(self, x):
        self.inside.set()
        assert self.release.wait(timeout=60)
        return x


def test_a_first_forward_measured_in_another_thread_hooks_nothing_here():
    """The ledger measures a model's first forward with torch's FLOP counter, whose module
    tracker registered process-wide module hooks while it ran: a model stepping in another
    thread got gradient hooks on its tensors, and the graph-free step (its loss taken on a leaf
    output) failed with "A leaf node was passed to _will_engine_execute_node". The training
    equals the same steps taken with no other thread."""
    config = tinyprop.TinyPropConfig(policy="tinypropv2")
    model = tinyprop.apply(build("conv1d", dtype=torch.float32), config)
    alone = copy.deepcopy(model)
    x, _ = batch("conv1d", size=8, dtype=torch.float32)
    assert graph_free.eligible(model, x)
    train(model, "conv1d", 1, seed=1, dtype=torch.float32)  # its own first forward, measured
    expected = train(alone, "conv1d", 1, seed=1, dtype=torch.float32)
    expected += train(alone, "conv1d", 3, dtype=torch.float32)

    waits = _Waits()
    measuring = tinyprop.apply(nn.Sequential(nn.Linear(3, 4), waits), config)
    errors = []

    def first_forward():
        try:
            measuring(torch.ones(2, 3))
        except Exception as error:  # noqa: BLE001 (reported by the assertion below)
            errors.append(error)

    thread = threading.Thread(target=first_forward)
    thread.start()
    try:
        assert waits.inside.wait(timeout=60)
        hooks = nn.modules.module
        assert not hooks._global_forward_pre_hooks and not hooks._global_forward_hooks
        done = train(model, "conv1d", 3, dtype=torch.float32)
    finally:
        waits.release.set()
        thread.join()
    assert errors == []
    assert [expected[0], *done] == expected
    assert_same_state(model, alone)
