"""train_step's bookkeeping around the step itself: the gradients it zeroes first (by a walk of
its own where PyTorch's zero_grad would run, tinyprop.trainer.zero_gradients)."""

from __future__ import annotations

import copy

import torch
from core_models import batch, build
from torch import nn

import tinyprop
from tinyprop import trainer

LOSS = nn.CrossEntropyLoss(reduction="none")
CONFIG = tinyprop.TinyPropConfig(policy="tinypropv2", skip_threshold=0.5)


def nested_model() -> nn.Module:
    """A module tree with a nested Sequential, a parameter two modules share, a submodule
    registered as None and a parameter registered as None."""
    shared = nn.Linear(4, 4)
    model = nn.Sequential(nn.Sequential(shared, nn.ReLU()), shared, nn.Linear(4, 3))
    model.register_module("absent", None)
    model[2].register_parameter("extra", None)
    return model.double()


def test_zero_gradients_sets_every_gradient_pytorch_would_to_none():
    model = nested_model()
    outside = nn.Parameter(torch.ones(2, dtype=torch.float64))  # the optimizer's, not the model's
    optimizer = torch.optim.SGD([*model[2].parameters(), outside], lr=0.1)
    for parameter in [*model.parameters(), outside]:
        parameter.grad = torch.ones_like(parameter)
    trainer.zero_gradients(model, optimizer)
    assert all(parameter.grad is None for parameter in [*model.parameters(), outside])


class Child(nn.Module):
    """A submodule that registers the model it belongs to (a cycle in the module tree)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x)


class WithCycle(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(8, 4)
        self.child = Child()
        self.child.owner = self  # PyTorch's own walks (named_modules) meet it once

    def forward(self, x):
        return self.child(torch.relu(self.first(x)))


def test_a_module_tree_with_a_cycle_is_zeroed_and_trains():
    """A submodule registering its parent: zeroing walked the cycle forever (train_step hung)."""
    torch.manual_seed(0)
    model = tinyprop.apply(WithCycle(), tinyprop.TinyPropConfig(policy="topk", ratio=0.5))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for parameter in model.parameters():
        parameter.grad = torch.ones_like(parameter)
    trainer.zero_gradients(model, optimizer)
    assert all(parameter.grad is None for parameter in model.parameters())
    before = [parameter.detach().clone() for parameter in model.parameters()]
    stats = tinyprop.train_step(model, torch.randn(5, 8), torch.arange(5) % 3, LOSS, optimizer)
    assert stats.trained == 5
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_overridden_zero_grad_and_named_modules_are_called():
    calls = []

    class Counted(torch.optim.SGD):
        def zero_grad(self, set_to_none=True):
            calls.append(("optimizer", set_to_none))
            super().zero_grad(set_to_none)

    class OwnZeroGrad(nn.Sequential):
        def zero_grad(self, set_to_none=True):
            calls.append(("model", set_to_none))
            super().zero_grad(set_to_none)

    class OwnModules(nn.Module):  # lists a module it does not register
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, 3)
            self.hidden = [nn.Linear(3, 3)]

        def named_modules(self, *args, **kwargs):
            yield from super().named_modules(*args, **kwargs)
            yield "hidden", self.hidden[0]

    model = OwnZeroGrad(nn.Linear(3, 3))
    trainer.zero_gradients(model, Counted(model.parameters(), lr=0.1))
    assert calls == [("model", True), ("optimizer", True)]
    own = OwnModules()
    for parameter in [*own.parameters(), *own.hidden[0].parameters()]:
        parameter.grad = torch.ones_like(parameter)
    trainer.zero_gradients(own, torch.optim.SGD(own.linear.parameters(), lr=0.1))
    assert own.hidden[0].weight.grad is None  # by its own named_modules, as zero_grad does

    class SomeParameters(nn.Sequential):  # offers only its last layer's parameters
        def parameters(self, recurse=True):
            return self[-1].parameters(recurse)

    some = SomeParameters(nn.Linear(3, 3), nn.Linear(3, 3))
    for parameter in nn.Module.parameters(some):
        parameter.grad = torch.ones_like(parameter)
    trainer.zero_gradients(some, torch.optim.SGD(some[1].parameters(), lr=0.1))
    assert some[0].weight.grad is not None and some[1].weight.grad is None  # as zero_grad


def test_a_stale_gradient_outside_the_model_is_not_stepped():
    """A parameter the optimizer holds but the model does not: its gradient from before the
    step is dropped, so the optimizer leaves it alone, as after optimizer.zero_grad()."""
    model = tinyprop.apply(build("mlp"), CONFIG)
    outside = nn.Parameter(torch.ones(3, dtype=torch.float64))
    optimizer = torch.optim.SGD([*model.parameters(), outside], lr=0.5)
    outside.grad = torch.ones_like(outside)
    x, y = batch("mlp", size=8)
    stats = tinyprop.train_step(model, x, y, LOSS, optimizer)
    assert stats.stepped
    assert outside.grad is None
    assert torch.equal(outside.detach(), torch.ones(3, dtype=torch.float64))


def test_train_step_does_not_run_pytorchs_zero_grad_wrappers(monkeypatch):
    """The cost this walk saves (fails before: train_step called both methods every step),
    with the same weights as a step after PyTorch's own zero_grad."""
    model = tinyprop.apply(build("mlp"), CONFIG)
    reference = copy.deepcopy(model)
    optimizers = [torch.optim.Adam(m.parameters(), lr=0.01) for m in (model, reference)]
    x, y = batch("mlp", size=8)
    reference.zero_grad(set_to_none=True)
    optimizers[1].zero_grad(set_to_none=True)
    monkeypatch.setattr(trainer, "zero_gradients", lambda module, optimizer: None)
    tinyprop.train_step(reference, x, y, LOSS, optimizers[1])
    monkeypatch.undo()

    def refused(*args, **kwargs):
        raise AssertionError("PyTorch's zero_grad ran")

    monkeypatch.setattr(nn.Module, "zero_grad", refused)
    monkeypatch.setattr(torch.optim.Optimizer, "zero_grad", refused)
    tinyprop.train_step(model, x, y, LOSS, optimizers[0])
    for got, expected in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(got, expected)
