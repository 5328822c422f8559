"""LazyAdam: Adam where the gradient is dense, untouched entries where it is zero; the bench's
optimizer setting."""

import pytest
import torch
from torch import nn

from tinyprop.bench import runner, suites
from tinyprop.optim import LazyAdam, make_optimizer


def test_lazy_adam_is_adam_on_dense_gradients():
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    twin = nn.Linear(6, 3)
    twin.load_state_dict(model.state_dict())
    lazy, adam = LazyAdam(model.parameters(), lr=0.01), torch.optim.Adam(twin.parameters(), 0.01)
    for _ in range(20):
        x = torch.randn(8, 6)
        for net, optimizer in ((model, lazy), (twin, adam)):
            optimizer.zero_grad()
            net(x).pow(2).sum().backward()
            optimizer.step()
    for mine, theirs in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def test_lazy_adam_leaves_entries_without_gradient_alone():
    weight = nn.Parameter(torch.ones(2, 3))
    optimizer = LazyAdam([weight], lr=0.1)
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    for step in range(3):
        weight.grad = mask * (step + 1.0)
        optimizer.step()
    assert (weight[mask == 0] == 1).all()
    assert (optimizer.state[weight]["steps"] == 3 * mask).all()
    # a rarely moved entry moves by lr per step like a dense one (Adam's first step is lr)
    weight.grad = torch.zeros(2, 3)
    weight.grad[0, 1] = 5.0
    optimizer.step()
    assert float(weight.detach()[0, 1]) == pytest.approx(1 - 0.1)


def test_unknown_optimizer_and_bad_lr_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'"):
        make_optimizer("rmsprop", nn.Linear(2, 2), 0.1)
    suite = suites.get("tiny")
    for bad, words in (({"optimizer": "rmsprop"}, "unknown optimizer"), ({"lr": -1}, "lr")):
        broken = suites.Suite("broken", suite.datasets, {"full": [bad]}, seeds=(0,))
        with pytest.raises(ValueError, match=words):
            runner.plan_runs(broken, "scratch", str(tmp_path))


def test_a_run_records_its_optimizer(tmp_path):
    suite = suites.get("tiny")
    sgd = suites.Suite("tiny", suite.datasets, {"tinypropv2": [{"budget": 0.3, "optimizer":
                       "sgd", "lr": 0.05}]}, seeds=(0,))  # fmt: skip
    (spec,) = runner.plan_runs(sgd, "scratch", str(tmp_path), datasets=["tiny-blobs"])
    record = runner.execute_run(spec)
    assert record["optimizer"] == "sgd" and record["lr"] == 0.05
    assert record["settings_label"] == "budget=0.3,lr=0.05,optimizer=sgd"
    assert 0.2 < record["backward_ratio"] < 0.4
