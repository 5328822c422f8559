"""TinyProp's k formula, TinyPropv2's skip decision, and exact checkpoint/resume."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from core_models import batch, build
from torch import nn

import tinyprop
from tinyprop.functional import adaptive_keep_count, keep_count

LOSS = nn.CrossEntropyLoss(reduction="none")


def test_adaptive_keep_count_on_hand_made_errors():
    error = torch.tensor([2.0, 1.0, 4.0, 0.5])
    running = torch.tensor([2.0, 2.0, 4.0, 4.0])  # the cumulative max from a previous max of 0
    keep = adaptive_keep_count(error, running, 0.1, 0.9, 0.5, depth=1, size=100)
    # bpr = (0.1 + α·0.8)·0.5 with α = 1, 0.5, 1, 0.125 -> 0.45, 0.25, 0.45, 0.1 -> k = bpr·100
    assert keep.tolist() == [45, 25, 45, 10]


def test_adaptive_keep_count_without_any_error_keeps_one():
    keep = adaptive_keep_count(torch.zeros(3), torch.zeros(3), 0.1, 0.9, 1.0, depth=0, size=50)
    assert keep.tolist() == [1, 1, 1]


def test_keep_count_clamps_to_one_and_to_n():
    assert keep_count(1e-6, 100).item() == 1
    assert keep_count(1.0, 100).item() == 100
    assert keep_count(0.125, 4).item() == 1  # 0.5 rounds half up
    assert keep_count(0.375, 4).item() == 2  # 1.5 rounds half up
    full = adaptive_keep_count(torch.ones(2), torch.ones(2), 1.0, 1.0, 1.0, depth=0, size=7)
    assert full.tolist() == [7, 7]
    tiny = adaptive_keep_count(torch.ones(2), torch.ones(2), 0.0, 0.0, 1.0, depth=3, size=7)
    assert tiny.tolist() == [1, 1]


@pytest.mark.parametrize("policy", ["tinyprop", "tinypropv2"])
def test_train_step_keeps_k_by_the_formula(policy):
    """One Linear layer: δ = softmax - onehot; k from the running max over the batch in order."""
    torch.manual_seed(1)
    layer = nn.Linear(4, 10).double()
    config = tinyprop.TinyPropConfig(policy=policy, s_min=0.2, s_max=0.8, skip_threshold=0.0)
    model = tinyprop.apply(nn.Sequential(layer), config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    previous_max = 0.0
    for step in range(3):
        x = torch.randn(5, 4, dtype=torch.float64)
        y = torch.randint(0, 10, (5,))
        with torch.no_grad():
            delta = F.softmax(layer(x), 1) - F.one_hot(y, 10)
        error = delta.abs().sum(1)
        expected = []
        for value in error.tolist():
            previous_max = max(previous_max, value)
            ratio = 0.2 + value / previous_max * 0.6
            expected.append(min(max(int(ratio * 10 + 0.5), 1), 10))
        stats = tinyprop.train_step(model, x, y, LOSS, optimizer)
        assert stats.keep["0"].tolist() == expected, step
        assert model[0].error_max.item() == pytest.approx(previous_max)


class HeadRegisteredFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 3)  # registered first, called last
        self.body = nn.Linear(4, 8)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def test_depth_follows_the_forward_order_not_the_registration_order():
    config = tinyprop.TinyPropConfig(policy="tinyprop", s_min=1.0, s_max=1.0, zeta=0.5)
    model = tinyprop.apply(HeadRegisteredFirst().double(), config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    stats = tinyprop.train_step(model, x, y, LOSS, optimizer)
    assert stats.keep["head"].tolist() == [3] * 4  # d = 0: ζ^0 · 3 outputs
    assert stats.keep["body"].tolist() == [4] * 4  # d = 1: ζ^1 · 8 outputs
    assert list(stats.keep) == ["body", "head"]  # forward order


def adam_state(optimizer):
    return copy.deepcopy(optimizer.state_dict()["state"])


def test_step_with_every_sample_skipped_changes_nothing():
    model = tinyprop.apply(build("mlp"), tinyprop.TinyPropConfig(skip_threshold=0.3))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    x, y = batch("mlp", size=8)
    first = tinyprop.train_step(model, x, y, LOSS, optimizer)  # trains: sets Ymax and Adam state
    assert first.trained > 0 and first.stepped
    parameters = copy.deepcopy(dict(model.named_parameters()))
    state = adam_state(optimizer)
    # the same inputs with the labels the model now predicts: tiny errors, all below τ·Ymax
    with torch.no_grad():
        easy = model(x).argmax(1)
    model[4].bias.data  # noqa: B018 (no change expected)
    # τ at the largest D (D_max·β = 1) and Ymax far above every error: every D < τ, all skipped
    model.__dict__["_tinyprop_state"].config = tinyprop.TinyPropConfig(skip_threshold=1.0)
    model.tinyprop_output_error_max.fill_(1e6)
    stats = tinyprop.train_step(model, x, easy, LOSS, optimizer)
    assert stats.trained == 0 and stats.skipped == 8 and not stats.stepped
    assert stats.macs.backward == 0 and stats.macs.forward > 0
    for name, value in model.named_parameters():
        assert torch.equal(value, parameters[name]), name
    after = adam_state(optimizer)
    for index, entry in state.items():
        for key, value in entry.items():
            assert torch.equal(after[index][key], value), key


def test_partly_skipped_step_equals_training_on_the_trained_samples_alone():
    plain = build("cnn")
    x, y = batch("cnn", size=8, seed=3)
    with torch.no_grad():
        error = (F.softmax(plain(x), 1) - F.one_hot(y, 5)).abs().sum(1)  # (B,) Y_L
    # Ymax_L preset to 2 (the largest Y_L cross-entropy gives): D = Y_L / 2; τ at the median
    config = tinyprop.TinyPropConfig(skip_threshold=float(error.median()) / 2)
    model = tinyprop.apply(plain, config)
    model.tinyprop_output_error_max.fill_(2.0)
    twin = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    stats = tinyprop.train_step(model, x, y, LOSS, optimizer)
    assert 0 < stats.trained < 8, "the fixture should skip some samples, not all"
    chosen = stats.trained_mask
    # TinyProp v1 on the trained samples only, with the same running state
    twin.__dict__["_tinyprop_state"].config = config.replace(policy="tinyprop")
    twin_optimizer = torch.optim.SGD(twin.parameters(), lr=0.0)
    twin_stats = tinyprop.train_step(twin, x[chosen], y[chosen], LOSS, twin_optimizer)
    for name in stats.keep:
        assert torch.equal(stats.keep[name], twin_stats.keep[name]), name
    scale = stats.trained / 8  # v2 averages over the whole batch; the twin over its samples
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad * scale, rtol=0, atol=1e-12, msg=name)
    for (name, b), c in zip(model.named_buffers(), twin.named_buffers(), strict=False):
        if name.endswith("error_max") and name != "tinyprop_output_error_max":
            assert torch.equal(b, c[1]), name


def test_skipped_samples_do_not_update_hidden_running_max():
    model = tinyprop.apply(build("mlp"), tinyprop.TinyPropConfig(skip_threshold=1.0))
    model.tinyprop_output_error_max.fill_(1e6)  # every D = Y_L / Ymax_L < τ: all skipped
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = batch("mlp")
    tinyprop.train_step(model, x, y, LOSS, optimizer)
    assert model.tinyprop_output_error_max.item() > 0
    assert all(model[i].error_max.item() == 0 for i in (0, 2, 4))


def test_remove_restores_state_dict_and_modules():
    model = build("cnn")
    before = copy.deepcopy(model.state_dict())
    classes = [type(m) for m in model.modules()]
    tinyprop.apply(model, tinyprop.TinyPropConfig(policy="topk"))
    assert tinyprop.is_tinyprop(model)
    tinyprop.remove(model)
    assert not tinyprop.is_tinyprop(model)
    assert [type(m) for m in model.modules()] == classes
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[key], before[key]) for key in before)


@pytest.mark.parametrize("policy", ["tinypropv2", "randomk", "tinyprop"])
def test_checkpoint_and_resume_is_exact(policy):
    config = tinyprop.TinyPropConfig(policy=policy, skip_threshold=0.4)
    batches = [batch("cnn", size=4, seed=s, dtype=torch.float32) for s in range(6)]

    def fresh():
        model = tinyprop.apply(build("cnn", dtype=torch.float32), config)
        return model, torch.optim.Adam(model.parameters(), lr=1e-2)

    straight, straight_opt = fresh()
    for x, y in batches:
        tinyprop.train_step(straight, x, y, LOSS, straight_opt)

    first, first_opt = fresh()
    for x, y in batches[:3]:
        tinyprop.train_step(first, x, y, LOSS, first_opt)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": first_opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    resumed, resumed_opt = fresh()
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt.load_state_dict(checkpoint["optimizer"])
    for x, y in batches[3:]:
        tinyprop.train_step(resumed, x, y, LOSS, resumed_opt)
    for (name, a), b in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
