"""Checkpoints whose tinyprop state was corrupted (scaled, NaN, of another model): refused when
loaded, or at the first step when only this model's step can tell, with the entry named; a
sound checkpoint resumed at another batch size trains on."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tinyprop
from tinyprop.budget import BudgetController, count_check

LOSS = nn.CrossEntropyLoss(reduction="none")
CONFIG = tinyprop.TinyPropConfig(policy="tinypropv2", budget=0.3)
X = torch.randn(512, 20, generator=torch.Generator().manual_seed(0))
Y = (X[:, 0] + X[:, 1] > 0).long()


def model() -> nn.Module:
    torch.manual_seed(0)
    return tinyprop.apply(nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 2)), CONFIG)


def train(net: nn.Module, steps: int, start: int = 0, batch: int = 32) -> tinyprop.Ledger:
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    ledger = tinyprop.Ledger()
    for step in range(start, start + steps):
        rows = slice(step * batch % 512, step * batch % 512 + batch)
        ledger += tinyprop.train_step(net, X[rows], Y[rows], LOSS, optimizer).macs
    return ledger


@pytest.fixture(scope="module")
def checkpoint() -> dict:
    """A run's state after 3 steps (its ratio still away from b)."""
    net = model()
    train(net, 3)
    return net.state_dict()


def scaled(checkpoint: dict, names: list[str], factor: float, recheck: bool = True) -> dict:
    """The checkpoint with the named budget counts scaled; ``recheck``: its check value made
    to fit them (a foreign or hostile checkpoint; a count changed alone does not fit it)."""
    corrupt = dict(checkpoint)
    for name in names:
        entry = f"tinyprop_budget_{name}"
        corrupt[entry] = (corrupt[entry].double() * factor).long()
    if recheck:
        counts = [int(corrupt[name]) for name in BudgetController.COUNTS]
        corrupt[BudgetController.CHECK] = torch.tensor(count_check(counts))
    return corrupt


@pytest.mark.parametrize(
    "names, factor, match",
    [  # before: the run held its backward ratio at ~0.08 (or ~0.9) of b = 0.3, silently
        (["spent"], 1e9, "backward ratio"),
        (["spent"], 1e3, "run ratio"),
        (["dense"], 1e9, "dense backward MACs per step"),
        (["spent", "dense"], 1e9, "dense backward MACs per step"),
        (["spent", "dense", "smoothed_spent", "smoothed_dense"], 1e9, "per step"),
        (["smoothed_dense"], 1e9, "smoothed count"),
    ],
)
def test_scaled_budget_counts_are_refused(checkpoint, names, factor, match):
    net = model()
    try:
        net.load_state_dict(scaled(checkpoint, names, factor))
    except ValueError as error:  # refused when loaded
        assert match in str(error)
        return
    before = {name: value.clone() for name, value in net.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        train(net, 1)  # the first step tells the scale of this model's counts
    for name, value in net.state_dict().items():  # nothing written, the weights untouched
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize(
    "name", ["spent", "dense", "steps", "smoothed_spent", "smoothed_dense", "check"]
)
@pytest.mark.parametrize("factor", [10, 0.5])
def test_one_budget_count_scaled_alone_is_refused_by_the_check_value(checkpoint, name, factor):
    """One count x 10 (or halved) passed every check on the counts (a run ratio of 0.3 x 10,
    a step count 10 times too high) and loaded: the controller then held the run away from b.
    The checkpoint's check value of the five counts tells."""
    with pytest.raises(ValueError, match="do not give their check value.*afresh"):
        model().load_state_dict(scaled(checkpoint, [name], factor, recheck=False))


def test_a_checkpoint_saved_before_the_check_value_loads_and_resumes(checkpoint):
    """A checkpoint without the check value (saved before it existed) loads, strict, with its
    counts; the check value is computed from them, so that it saves and loads again."""
    old = {k: v for k, v in checkpoint.items() if k != "tinyprop_budget_check"}
    net = model()
    net.load_state_dict(old)
    assert int(net.tinyprop_budget_steps) == 3
    assert int(net.tinyprop_budget_check) == int(checkpoint["tinyprop_budget_check"]) != 0
    train(net, 2, start=3)
    model().load_state_dict(net.state_dict())
    without = {k: v for k, v in checkpoint.items() if not k.startswith("tinyprop_budget_")}
    model().load_state_dict(without)  # no controller at all: it starts afresh, as before


@pytest.mark.parametrize("value", [1e30, 2.5, -3.0, float("nan")])
def test_a_count_that_is_no_whole_number_is_refused(checkpoint, value):
    """A float 1e30 became -2^63 in the int64 buffer; 2.5 was cut to 2."""
    corrupt = dict(checkpoint, tinyprop_budget_steps=torch.tensor(value, dtype=torch.float64))
    with pytest.raises(ValueError, match="tinyprop_budget_steps"):
        model().load_state_dict(corrupt)


def test_counts_after_zero_steps_are_refused(checkpoint):
    corrupt = scaled(dict(checkpoint, tinyprop_budget_steps=torch.tensor(0)), [], 1)
    with pytest.raises(ValueError, match="tinyprop_budget_steps is 0"):
        model().load_state_dict(corrupt)


def test_a_sound_checkpoint_resumes_at_batch_size_one_and_holds_the_budget(checkpoint):
    net = model()
    net.load_state_dict(checkpoint)
    ledger = train(net, 150, start=3, batch=1)
    assert abs(ledger.backward_ratio() - 0.3) < 0.1 * 0.3 + 0.02


@pytest.mark.parametrize("value", [-5, 2**63 - 1, float("nan")])
def test_a_layer_backward_count_that_is_negative_huge_or_nan_is_refused(value):
    """A layer's ``backward_steps`` (random-k draws from it) loaded as it was: -5, 2^63 - 1
    (wrapped to -2^63 at the next step) or a float NaN (-2^63 in the int64 buffer)."""
    config = tinyprop.TinyPropConfig(policy="randomk", ratio=0.5)
    net = tinyprop.apply(nn.Sequential(nn.Linear(20, 8), nn.ReLU(), nn.Linear(8, 2)), config)
    corrupt = dict(net.state_dict())
    corrupt["0.backward_steps"] = torch.tensor(value)
    with pytest.raises(ValueError, match="'0.backward_steps' is .*set it to 0"):
        net.load_state_dict(corrupt)


@pytest.mark.parametrize(
    "entry, dtype",
    [  # before: loaded through PyTorch's copy, silently
        ("tinyprop_score_window", torch.int64),  # NaN (empty) slots: -9.2e18, every sample trained
        ("tinyprop_output_error_max", torch.bool),  # Ymax_L became 1.0
        ("2.error_max", torch.complex64),  # imaginary part dropped
        ("0.backward_steps", torch.bool),
        ("tinyprop_budget_log_keep_scale", torch.int64),  # log c rounded to a whole number
        ("tinyprop_budget_spent", torch.complex128),
    ],
)
def test_an_entry_of_a_dtype_tinyprop_never_writes_is_refused(checkpoint, entry, dtype):
    corrupt = dict(checkpoint)
    corrupt[entry] = checkpoint[entry].to(dtype)
    with pytest.raises(ValueError, match=f"'{entry}' is a {dtype} tensor, but tinyprop saves it"):
        model().load_state_dict(corrupt)
    sound = dict(checkpoint)
    if checkpoint[entry].is_floating_point():  # a half-precision model's float16 entries load
        sound[entry] = checkpoint[entry].half()
    model().load_state_dict(sound)


def applied_on_meta() -> nn.Module:
    """The model of :func:`model` built and applied on the meta device (how large models are
    made before their weights are read), then given memory with ``to_empty``."""
    with torch.device("meta"):
        net = tinyprop.apply(nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 2)), CONFIG)
    return net


def tinyprop_entries(net: nn.Module) -> dict:
    return {k: v for k, v in net.state_dict().items() if not k.endswith(("weight", "bias"))}


def test_a_model_applied_on_the_meta_device_starts_its_running_state_afresh():
    """``to_empty`` leaves tinyprop's buffers holding whatever the memory held (Ymax_l of 7e14
    skipped every sample, silently; a budget controller of garbage counts), and
    ``load_state_dict(plain, assign=True)`` left them on meta ("Tensor.item() cannot be
    called on meta tensors" at the step). They start afresh as after a plain ``apply``,
    unless a checkpoint gave them values."""
    reference = model()
    weights = {
        k: v.clone() for k, v in reference.state_dict().items() if k.endswith(("weight", "bias"))
    }
    emptied = applied_on_meta().to_empty(device="cpu")
    with torch.no_grad():
        for buffer in tinyprop_entries(emptied).values():
            buffer.fill_(7e14 if buffer.is_floating_point() else 123456789)  # what memory held
        for name, parameter in emptied.named_parameters():  # an init of one's own
            parameter.copy_(weights[name])
    assigned = applied_on_meta()
    assigned.load_state_dict(weights, assign=True)
    ledgers = [train(net, 4) for net in (reference, emptied, assigned)]
    assert ledgers[0].backward_ratio() < 1.0
    for net, ledger in zip((emptied, assigned), ledgers[1:], strict=True):
        assert ledger == ledgers[0]
        for name, value in reference.state_dict().items():
            torch.testing.assert_close(
                net.state_dict()[name], value, rtol=0, atol=0, equal_nan=True, msg=name
            )
    trained = reference.state_dict()  # a checkpoint loaded after to_empty keeps its values
    resumed = applied_on_meta().to_empty(device="cpu")
    resumed.load_state_dict(trained)
    train(resumed, 1, start=4)
    again = model()
    again.load_state_dict(trained)
    train(again, 1, start=4)
    for name, value in again.state_dict().items():
        torch.testing.assert_close(
            resumed.state_dict()[name], value, rtol=0, atol=0, equal_nan=True, msg=name
        )


@pytest.mark.parametrize("entry", ["tinyprop_output_error_max", "2.error_max"])
def test_an_absurd_but_finite_running_maximum_is_refused_at_the_first_step(entry):
    """Ymax_L = 1e30 passes every check on its own value (finite, >= 0, fits float32), and
    then skipped every sample for good, silently. The output layer's Ymax_l tells it apart:
    the sample that set Ymax_L was trained, so Ymax_l <= Ymax_L <= R·Ymax_l in any run of a
    model whose output is its last layer's. Refused at the first step, before any write; a
    sound checkpoint trains on. (With a budget the decision takes a percentile, not Ymax_L.)"""

    def plain_v2() -> nn.Module:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 2))
        return tinyprop.apply(net, tinyprop.TinyPropConfig(policy="tinypropv2"))

    net = plain_v2()
    train(net, 3)
    checkpoint = net.state_dict()
    net = plain_v2()
    net.load_state_dict(checkpoint)
    assert train(net, 1, start=3).backward_ratio() > 0
    corrupt = dict(checkpoint)
    corrupt[entry] = torch.tensor(1e30)
    net = plain_v2()
    net.load_state_dict(corrupt)
    before = {name: value.clone() for name, value in net.state_dict().items()}
    for _ in range(2):  # refused again, not only once
        with pytest.raises(ValueError, match="tinyprop_output_error_max.*does not fit"):
            train(net, 1, start=3)
    for name, value in net.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("how", ["meta", "in place"])
@pytest.mark.parametrize("policy", ["tinypropv2", "randomk"])
def test_a_model_given_empty_storage_after_apply_starts_its_running_state_afresh(policy, how):
    """``model.to("meta")`` of an applied (and trained) model, then ``to_empty`` and weights of
    one's own, or ``to_empty`` straight on the CPU: tinyprop's buffers held whatever the memory
    held (Ymax_l of 7e14, random-k seeded by a garbage backward count), silently, where a model
    applied on meta starts afresh. It trains as the same weights applied anew."""
    config = tinyprop.TinyPropConfig(policy=policy, ratio=0.3)

    def applied(weights: dict | None = None) -> nn.Module:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 2))
        if weights is not None:
            net.load_state_dict(weights)
        return tinyprop.apply(net, config)

    moved = applied()
    weights = {name: value.clone() for name, value in moved.named_parameters()}
    train(moved, 2)
    if how == "meta":
        moved.to("meta").to_empty(device="cpu")
    else:  # fresh storage on its own device, without the move to meta
        moved.to_empty(device="cpu")
    with torch.no_grad():
        for buffer in tinyprop_entries(moved).values():
            buffer.fill_(7e14 if buffer.is_floating_point() else 123456789)  # what memory held
        for name, parameter in moved.named_parameters():  # an init of one's own
            parameter.copy_(weights[name])
    fresh = applied(weights)
    assert train(moved, 3) == train(fresh, 3)
    for name, value in fresh.state_dict().items():
        torch.testing.assert_close(moved.state_dict()[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(
    "entry, value",
    [
        ("2.error_max", torch.tensor(float("nan"))),
        ("2.backward_steps", torch.tensor(-3)),
        ("2.error_max", torch.tensor(1.0, dtype=torch.complex64)),
    ],
)
@pytest.mark.parametrize("inside", [False, True])
def test_a_corrupt_entry_of_a_later_layer_loads_nothing(checkpoint, entry, value, inside):
    """The refusal of a later layer's running state came when that layer loaded: the layers
    before it had taken the checkpoint's weights and running maxima already, so a caller who
    caught the error went on training a model half one checkpoint's and half the other's. Now
    the applied model checks every layer's entries before anything loads (also inside a larger
    module being loaded)."""
    net = model()
    loaded, corrupt = (nn.ModuleDict({"net": net}), {}) if inside else (net, {})
    prefix = "net." if inside else ""
    corrupt.update({prefix + name: tensor for name, tensor in checkpoint.items()})
    corrupt[prefix + entry] = value
    before = {name: tensor.clone() for name, tensor in net.state_dict().items()}
    with pytest.raises(ValueError, match=f"'{prefix}{entry}' is "):
        loaded.load_state_dict(corrupt)
    for name, tensor in net.state_dict().items():
        # '0.weight' loaded before (the score window's empty slots are NaN)
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=0, equal_nan=True, msg=name)


@pytest.mark.parametrize("entry, shape", [("2.weight", (5, 32)), ("2.error_max", (2,))])
def test_a_checkpoint_entry_of_another_shape_loads_nothing(checkpoint, entry, shape):
    """PyTorch refuses an entry of another shape when it reaches it, after the modules before
    it loaded: '0.weight' was the checkpoint's, '2.weight' the model's. The applied model
    refuses it before anything loads, with PyTorch's message; a one-element entry of a scalar
    still loads, as in PyTorch."""
    net = model()
    before = {name: tensor.clone() for name, tensor in net.state_dict().items()}
    corrupt = {**checkpoint, entry: torch.zeros(shape)}
    with pytest.raises(RuntimeError, match=f"size mismatch for {entry}: .*Nothing was loaded"):
        net.load_state_dict(corrupt)
    for name, tensor in net.state_dict().items():
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=0, equal_nan=True, msg=name)
    net.load_state_dict({**checkpoint, "2.error_max": checkpoint["2.error_max"].reshape(1)})
    assert torch.equal(net[0].weight, checkpoint["0.weight"])
