"""NaN / inf inside a training step: a finite loss whose gradient is not (sqrt at 0), in the
output error, in a hidden layer's δ, or only in a dense module's parameter gradient. Every
policy and kernel set raises FloatingPointError before anything is updated."""

from __future__ import annotations

import copy

import pytest
import torch
from core_models import build
from torch import nn

import tinyprop
import tinyprop.native
import tinyprop.step
import tinyprop.trainer

POLICIES = ["full", "topk", "randomk", "tinyprop", "tinypropv2"]


@pytest.fixture(params=["native kernels", "pytorch kernels"])
def kernels(request, monkeypatch):
    if request.param == "pytorch kernels":
        monkeypatch.setattr(tinyprop.native, "can_select", lambda scores: False)
        monkeypatch.setattr(tinyprop.native, "can_backward", lambda x, weight: False)
    return request.param


def distance(output, target):
    """Per-sample Euclidean distance: finite at 0, but its gradient there is NaN."""
    return torch.sqrt(((output - target) ** 2).sum(1))


def snapshot(model, optimizer):
    return (
        copy.deepcopy(model.state_dict()),
        copy.deepcopy(optimizer.state_dict()["state"]),
    )


def assert_untouched(model, optimizer, before):
    parameters, optimizer_state = before
    for name, value in model.state_dict().items():  # the score window holds NaN (empty)
        torch.testing.assert_close(value, parameters[name], rtol=0, atol=0, equal_nan=True)
    after = optimizer.state_dict()["state"]
    for index, entry in optimizer_state.items():
        for key, value in entry.items():
            assert torch.equal(after[index][key], value), key
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("policy", POLICIES)
def test_nan_output_gradient_raises_before_any_update(policy, kernels):
    model = tinyprop.apply(
        build("mlp", dtype=torch.float32), tinyprop.TinyPropConfig(policy=policy)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    x = torch.randn(6, 12)
    tinyprop.train_step(model, x, torch.randn(6, 5), distance, optimizer)  # a good step first
    target = torch.randn(6, 5)
    with torch.no_grad():
        target[2] = model(x)[2]  # sample 2: distance 0, gradient NaN
    before = snapshot(model, optimizer)
    # full has no sparse layer to name the rows: the parameter gradient check catches it
    message = "parameter gradient is NaN" if policy == "full" else r"NaN or infinite.*\[2\]"
    with pytest.raises(FloatingPointError, match=message):
        tinyprop.train_step(model, x, target, distance, optimizer)
    assert_untouched(model, optimizer, before)
    # the model trains on afterwards, and its running maxima stayed finite
    stats = tinyprop.train_step(model, x, torch.randn(6, 5), distance, optimizer)
    assert stats.trained + stats.skipped == 6
    for name, buffer in model.named_buffers():
        if name.endswith("error_max"):
            assert torch.isfinite(buffer).all(), name


class SquareRootGain(nn.Module):
    """y = x · sqrt(g): g = 0 gives an infinite gradient of g alone."""

    def __init__(self, size: int):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(size))

    def forward(self, x):
        return x * torch.sqrt(self.gain)


@pytest.mark.parametrize(
    "policy", [*POLICIES, "selective_backprop", "tinypropv2-budget", "topk-budget"]
)
def test_nan_only_in_a_dense_parameter_gradient_raises(policy):
    """Also the budget controller and the score window stay as they were (they moved on
    for the refused step)."""
    name, _, budget = policy.partition("-")
    config = tinyprop.TinyPropConfig(
        policy=name, skip_threshold=0.0, budget=0.5 if budget else None
    )
    model = tinyprop.apply(  # the gain's vector is dense by design, without a warning
        nn.Sequential(nn.Linear(4, 6), SquareRootGain(6), nn.Linear(6, 3)), config
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss = nn.CrossEntropyLoss(reduction="none")
    for _ in range(2):  # a window and controller state that are not the initial ones
        tinyprop.train_step(model, torch.randn(5, 4), torch.randint(0, 3, (5,)), loss, optimizer)
    with torch.no_grad():
        model[1].gain[0] = 0.0
    before = snapshot(model, optimizer)
    with pytest.raises(FloatingPointError, match="parameter gradient is NaN or infinite"):
        tinyprop.train_step(model, torch.randn(5, 4), torch.randint(0, 3, (5,)), loss, optimizer)
    assert_untouched(model, optimizer, before)


def test_checkpoint_with_a_nan_running_maximum_is_refused():
    model = tinyprop.apply(build("mlp"), tinyprop.TinyPropConfig())
    state = model.state_dict()
    state["2.error_max"] = torch.tensor(float("nan"))
    with pytest.raises(ValueError, match="'2.error_max' is nan"):
        model.load_state_dict(state)
    state = model.state_dict()
    state["tinyprop_output_error_max"] = torch.tensor(float("inf"))
    with pytest.raises(ValueError, match="tinyprop_output_error_max' is inf"):
        model.load_state_dict(state)


@pytest.mark.parametrize("entry", ["2.error_max", "tinyprop_output_error_max"])
def test_checkpoint_maximum_past_its_float32_buffer_is_refused(entry):
    """A float64 1e39 is finite, and was loaded: the float32 buffer then held inf, and every
    sample was skipped from then on (Ymax_L), or the layer kept its floor of k (Ymax_l)."""
    model = tinyprop.apply(build("mlp"), tinyprop.TinyPropConfig())
    state = model.state_dict()
    state[entry] = torch.tensor(1e39, dtype=torch.float64)
    with pytest.raises(ValueError, match=f"'{entry}' is 1e\\+39.*at most 3.403e\\+38"):
        model.load_state_dict(state)
    state[entry] = torch.tensor(3e38, dtype=torch.float64)  # float32 holds it
    model.load_state_dict(state)


def test_own_loop_backward_raises_on_nan_and_keeps_maxima():
    model = tinyprop.apply(build("mlp", dtype=torch.float32), tinyprop.TinyPropConfig("tinyprop"))
    x = torch.randn(6, 12)
    tinyprop.backward(model, distance(model(x), torch.randn(6, 5)))
    maxima = {n: b.clone() for n, b in model.named_buffers() if n.endswith("error_max")}
    target = torch.randn(6, 5)
    output = model(x)
    target[4] = output[4].detach()
    with pytest.raises(FloatingPointError, match=r"layer '4'.*\[4\]"):
        tinyprop.backward(model, distance(output, target))
    for name, value in maxima.items():
        assert torch.equal(dict(model.named_buffers())[name], value), name
    # a GradScaler that is switched off checks nothing: the NaN must not pass on to .grad
    disabled = torch.amp.GradScaler("cpu", enabled=False)
    model.zero_grad()
    with pytest.raises(FloatingPointError, match=r"layer '4'.*\[4\]"):
        tinyprop.backward(model, distance(model(x), target), grad_scaler=disabled)


class Magnitude(nn.Module):
    """|x| as sqrt(x²): finite everywhere, gradient NaN (0 / 0) where x = 0."""

    def forward(self, x):
        return torch.sqrt(x**2)


@pytest.mark.parametrize("policy", POLICIES)
def test_nan_in_a_hidden_layer_delta_raises_before_any_update(policy, kernels):
    """Sample 2 reaches sqrt(x²) with x = 0: a NaN δ in the first layer only."""
    torch.manual_seed(0)
    model = tinyprop.apply(
        nn.Sequential(nn.Linear(4, 16), Magnitude(), nn.Linear(16, 3)),
        tinyprop.TinyPropConfig(policy=policy, skip_threshold=0.0),
    )
    with torch.no_grad():
        model[0].bias.zero_()
    x = torch.randn(8, 4)
    x[2] = 0.0
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    before = snapshot(model, optimizer)
    message = "parameter gradient is NaN" if policy == "full" else r"layer '0'.*rows \[2\]"
    with pytest.raises(FloatingPointError, match=message):
        tinyprop.train_step(
            model, x, torch.randint(0, 3, (8,)),
            nn.CrossEntropyLoss(reduction="none"), optimizer,
        )  # fmt: skip
    assert_untouched(model, optimizer, before)


def test_gradient_check_refuses_nan_and_inf_but_not_a_sum_that_overflows():
    """The check sums each gradient once; a finite gradient whose sum overflows float32 is
    checked element by element and passes, a NaN or inf one is refused with the rows named."""
    first, second = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(4))
    optimizer = torch.optim.SGD([first, second], lr=0.1)
    first.grad = torch.ones(3)
    second.grad = torch.full((4,), 3e38)  # finite; its sum is inf in float32
    assert torch.isinf(second.grad.sum())
    tinyprop.trainer.check_gradients(optimizer)  # no error
    for bad in (float("nan"), float("inf"), -float("inf")):
        second.grad = torch.tensor([1.0, bad, 2.0, 3.0])
        message = r"a parameter gradient is NaN or infinite \(optimizer parameters \[1\]"
        with pytest.raises(FloatingPointError, match=message):
            tinyprop.trainer.check_gradients(optimizer)
    half = nn.Parameter(torch.zeros(4, dtype=torch.float16))
    half.grad = torch.full((4,), 60000.0, dtype=torch.float16)  # summed in float32
    tinyprop.trainer.check_gradients(torch.optim.SGD([half], lr=0.1))


def test_a_weight_gradient_proved_finite_is_not_read_again():
    """A sparse Linear whose input is smaller than its weight proves its weight gradient
    finite from max |x| · Σ Y_l; train_step then skips it (the gradient is that tensor)."""
    model = tinyprop.apply(
        nn.Sequential(nn.Linear(64, 2), nn.ReLU(), nn.Linear(2, 64)),
        tinyprop.TinyPropConfig(policy="topk", ratio=0.25),
    )
    losses = model(torch.randn(2, 64)).square().sum(1)
    step = tinyprop.step.run_backward(model, losses, None, 0, None, 1.0)
    grad = model[2].weight.grad
    assert step.proven_finite[id(model[2].weight)] == (grad.data_ptr(), grad._version)
    assert step.proven_finite[id(model[0].weight)] is None  # x (2, 64) is not smaller


def test_a_weight_gradient_that_overflows_from_finite_factors_is_refused():
    """δ and x finite, their products past float32's range: the bound does not prove the
    gradient finite, the check finds the inf and refuses the step."""
    model = tinyprop.apply(nn.Linear(4, 3), tinyprop.TinyPropConfig(policy="topk", ratio=0.5))
    with torch.no_grad():
        model.weight.fill_(0.25)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.full((2, 4), 1e38)  # (2, 4): smaller than the weight (3, 4), so a bound is tried

    def wavy(output, target):  # finite at any finite output, |∂loss / ∂output| up to 100
        return 100 * torch.sin(output).sum(1)

    before = snapshot(model, optimizer)
    with pytest.raises(FloatingPointError, match="a parameter gradient is NaN or infinite"):
        tinyprop.train_step(model, x, torch.zeros(2), wavy, optimizer)
    assert_untouched(model, optimizer, before)


@pytest.mark.parametrize("policy", POLICIES)
def test_a_nan_loss_from_broken_weights_names_the_weights(policy):
    """A weight holding NaN (a step of too large a learning rate, a broken checkpoint) made
    every loss NaN, and the error said to check the inputs; it names the weights now."""
    model = tinyprop.apply(build("mlp"), tinyprop.TinyPropConfig(policy=policy))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 12, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    loss = nn.CrossEntropyLoss(reduction="none")
    with pytest.raises(FloatingPointError, match="Check the inputs"):
        tinyprop.train_step(model, x.clone().fill_(float("nan")), y, loss, optimizer)
    with torch.no_grad():
        model[4].weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="weights hold NaN or inf: 4.weight;"):
        tinyprop.train_step(model, x, y, loss, optimizer)
