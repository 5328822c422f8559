"""The budget controller: the backward ratio it holds, exact resume, bad budgets refused; and the
Selective-Backprop policy."""

import copy
import io
import math

import pytest
import torch
from torch import nn

import tinyprop
from tinyprop.budget import BudgetController, ScoreWindow
from tinyprop.functional import (
    budget_step_target,
    loss_cdf,
    percentile_keep,
    selective_backprop_probability,
    split_range,
)

LOSS = nn.CrossEntropyLoss(reduction="none")
SPARSE_POLICIES = ("topk", "randomk", "tinyprop", "tinypropv2", "selective_backprop")


def toy_stream(steps: int, batch: int = 32, seed: int = 0):
    """Batches of a 5-class problem whose difficulty drifts (the losses fall as it learns)."""
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(5, 20, generator=generator) * 0.4  # overlapping: never fit exactly
    for _ in range(steps):
        y = torch.randint(0, 5, (batch,), generator=generator)
        yield centers[y] + torch.randn(batch, 20, generator=generator), y


def toy_model(config: tinyprop.TinyPropConfig, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5)
    )
    return tinyprop.apply(net, config)


def run(model, batches, optimizer=None):
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    ledgers = []
    for x, y in batches:
        ledgers.append(tinyprop.train_step(model, x, y, LOSS, optimizer).macs)
    return ledgers


def ratio(ledgers) -> float:
    return sum(ledgers, tinyprop.Ledger()).backward_ratio()


@pytest.mark.parametrize("policy", SPARSE_POLICIES)
@pytest.mark.parametrize("budget", [0.1, 0.3])
def test_budget_is_held_on_a_toy_stream(policy, budget):
    config = tinyprop.TinyPropConfig(policy=policy, budget=budget, zeta=1.0)
    ledgers = run(toy_model(config), toy_stream(300))
    after_warm_up = ratio(ledgers[50:])
    whole_run = ratio(ledgers)
    assert abs(after_warm_up / budget - 1) <= 0.10, (after_warm_up, whole_run)
    assert abs(whole_run / budget - 1) <= 0.10, (after_warm_up, whole_run)


def test_tinypropv2_budget_uses_both_skipping_and_sparsity():
    config = tinyprop.TinyPropConfig(policy="tinypropv2", budget=0.1)
    model = toy_model(config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    skipped = trained = 0
    for x, y in toy_stream(100):
        stats = tinyprop.train_step(model, x, y, LOSS, optimizer)
        skipped, trained = skipped + stats.skipped, trained + stats.trained
    controller = tinyprop.model.state_of(model).policy.budget
    assert 0.1 < trained / (trained + skipped) < 0.9  # some samples skipped, not all
    assert controller.keep_scale < 1.0 and 0.05 < controller.run_ratio < 0.15


@pytest.mark.parametrize(
    "fields",
    [
        {"policy": "tinypropv2"},
        {"policy": "selective_backprop"},
        {"policy": "topk"},
        {"policy": "tinypropv2", "budget_schedule": 0.5, "budget_steps": 60},  # spent unevenly
    ],
)
def test_resume_from_state_dict_is_exact(fields):
    config = tinyprop.TinyPropConfig(budget=0.2, **fields)
    batches = list(toy_stream(60, seed=3))
    model = toy_model(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    run(model, batches[:30], optimizer)
    saved = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, saved)
    assert any(key.startswith("tinyprop_budget_") for key in model.state_dict())
    rest = run(model, batches[30:], optimizer)

    saved.seek(0)
    checkpoint = torch.load(saved, weights_only=True)
    resumed = toy_model(config, seed=99)  # different weights until loaded
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer = torch.optim.Adam(resumed.parameters(), lr=1e-3)
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    rest_again = run(resumed, batches[30:], resumed_optimizer)

    assert [ledger.as_dict() for ledger in rest] == [ledger.as_dict() for ledger in rest_again]
    for (name, value), (_, again) in zip(
        model.state_dict().items(), resumed.state_dict().items(), strict=True
    ):
        assert torch.equal(value, again) or (value.isnan() & again.isnan()).all(), name


def test_buffers_change_only_after_a_whole_backward():
    model = toy_model(tinyprop.TinyPropConfig(policy="tinypropv2", budget=0.2))
    before = copy.deepcopy(model.state_dict())
    x, y = next(toy_stream(1))
    output = model(x)
    tinyprop.loss(model, LOSS(output, y), output)  # decision made, no backward yet
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]) or value.isnan().all(), name
    model.zero_grad()
    output = model(x)
    tinyprop.backward(model, LOSS(output, y), output)
    assert int(model.tinyprop_budget_steps) == 1
    assert int(model.tinyprop_score_window_steps) == 1


def test_remove_drops_the_controller_buffers():
    model = toy_model(tinyprop.TinyPropConfig(policy="selective_backprop", budget=0.3))
    plain = tinyprop.remove(model)
    assert not any(key.startswith("tinyprop") for key in plain.state_dict())


@pytest.mark.parametrize(
    "budget, error, words",
    [
        (0.0, ValueError, "(0, 1]"),
        (1.5, ValueError, "(0, 1]"),
        (-0.1, ValueError, "(0, 1]"),
        (float("nan"), ValueError, "(0, 1]"),
        ("10%", TypeError, "number"),
        (True, TypeError, "number"),
    ],
)
def test_invalid_budgets_are_refused(budget, error, words):
    with pytest.raises(error, match=words.replace("(", r"\(").replace("]", r"\]")):
        tinyprop.TinyPropConfig(policy="tinypropv2", budget=budget)


def test_full_has_no_budget():
    with pytest.raises(ValueError, match="full policy has no budget"):
        tinyprop.TinyPropConfig(policy="full", budget=0.1)


def test_budget_step_target_pays_back_the_deviation():
    assert budget_step_target(0.1, 0, 0, 0, 20) == 0.1
    # run at 0.12 after 20 steps: the next steps aim 0.02 below the budget
    assert budget_step_target(0.1, 12, 100, 20, 20) == pytest.approx(0.08)
    assert budget_step_target(0.1, 90, 100, 1000, 20) == pytest.approx(0.025)  # limited to b/4


def test_split_range_moves_one_actuator_after_the_other():
    keep, train = (-2.0, 2.0), (-3.0, 1.0)
    assert split_range(0.0, 0.0, -1.0, keep, train) == (-1.0, 0.0)  # keep scale first
    assert split_range(-1.5, 0.0, -1.0, keep, train) == (-2.0, -0.5)  # then the share
    assert split_range(-2.0, -0.5, 1.0, keep, train) == (-1.5, 0.0)  # share back to q0 first
    assert split_range(1.5, 0.0, 1.0, keep, train) == (2.0, 0.5)  # keep cap, then share
    assert split_range(2.0, 1.0, 1.0, keep, train) == (2.0, 1.0)  # all saturated: dropped


def test_percentile_keep_trains_the_largest_share():
    window = torch.full((8,), float("nan"))
    scores = torch.arange(10, dtype=torch.float64)
    assert percentile_keep(scores, window, 0.3).sum() == 3
    assert percentile_keep(scores, window, 1.0).all()
    window = torch.arange(100, 108, dtype=torch.float64)  # the recent scores were all larger
    assert percentile_keep(scores, window, 0.3).sum() == 0


def test_selective_backprop_probability_is_cdf_to_the_beta():
    window = torch.tensor([1.0, 2.0, 3.0, float("nan")])
    losses = torch.tensor([0.5, 2.0, 4.0])
    assert loss_cdf(losses, window).tolist() == pytest.approx([1 / 6, 4 / 6, 1.0])
    probability = selective_backprop_probability(losses, window, 2.0)
    assert probability.tolist() == pytest.approx([1 / 36, 16 / 36, 1.0])


def test_selective_backprop_keeps_high_loss_samples_and_backpropagates_them_densely():
    config = tinyprop.TinyPropConfig(policy="selective_backprop", beta=2.0)
    model = toy_model(config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    trained = total = 0
    for x, y in toy_stream(40):
        stats = tinyprop.train_step(model, x, y, LOSS, optimizer)
        trained, total = trained + stats.trained, total + x.shape[0]
        for name, keep in stats.keep.items():  # every kept sample dense in every layer
            size = dict(model.named_modules())[name].out_features
            assert (keep == size).all()
        ledger = stats.macs
        # the ledger's backward is the dense backward of the trained samples only
        dense_per_sample = (ledger.backward_dense - ledger.unattributed) / x.shape[0]
        assert ledger.backward == pytest.approx(stats.trained * dense_per_sample)
    assert 0.2 < trained / total < 0.5  # E[U^2] = 1/3


def test_selective_backprop_prefers_large_losses():
    config = tinyprop.TinyPropConfig(policy="selective_backprop", beta=3.0)
    model = toy_model(config)
    kept_losses, skipped_losses = [], []
    for x, y in toy_stream(30):
        model.zero_grad()
        losses = LOSS(model(x), y)
        stats = tinyprop.backward(model, losses)
        kept_losses += losses[stats.trained_mask].tolist()
        skipped_losses += losses[~stats.trained_mask].tolist()
    kept = torch.tensor(kept_losses)
    skipped = torch.tensor(skipped_losses)
    assert 0.1 < len(kept) / (len(kept) + len(skipped)) < 0.4  # E[U^3] = 1/4
    assert kept.mean() > skipped.mean() and kept.median() > skipped.quantile(0.75)


def test_controller_and_window_are_documented_objects():
    assert "r* = b + (b - R)" in tinyprop.budget.__doc__
    assert BudgetController.finish_step.__doc__ and ScoreWindow.push.__doc__


def test_report_has_an_equal_compute_table():
    from tinyprop.bench.report import budget_of, budget_table, summarise

    assert budget_of("budget=0.05,dense_output_layer=True") == 0.05
    assert budget_of("budget=0.2,lr=0.01,optimizer=sgd") is None  # the optimizer study
    assert budget_of("ratio=0.1") is None
    assert budget_of("budget=0.2,zeta=1.0") is None

    def record(policy, label, metric, backward, seed):
        return {
            "protocol": "finetune", "dataset": "d", "source": "s", "model": "m",
            "policy": policy, "settings": {}, "settings_label": label, "seed": seed,
            "metric_name": "accuracy", "metric": metric, "val_metric": metric,
            "compute_ratio": 0.5, "backward_ratio": backward, "skip_rate": 0.0,
        }  # fmt: skip

    records = [record("full", "default", 90.0, 1.0, seed) for seed in (0, 1)]
    records += [record("topk", "budget=0.1", 80.0 + seed, 0.1, seed) for seed in (0, 1)]
    records += [record("tinypropv2", "budget=0.1", 88.0, 0.1, seed) for seed in (0, 1)]
    lines = budget_table(summarise(records))
    assert "| d | topk | 90.00 ± 0.00 | 80.50 ± 0.71 (10.0) |" in lines
    assert "| d | tinypropv2 | 90.00 ± 0.00 | 88.00 ± 0.00 (10.0) |" in lines


@pytest.mark.parametrize("skip_split, start", [(0.0, 1.0), (0.5, 0.5), (1.0, 0.25)])
def test_skip_split_sets_the_trained_share_at_the_start(skip_split, start):
    config = tinyprop.TinyPropConfig(policy="tinypropv2", budget=0.25, skip_split=skip_split)
    controller = tinyprop.model.state_of(toy_model(config)).policy.budget
    assert controller.trained_share == pytest.approx(start)


def test_skip_split_zero_skips_only_once_the_layers_are_as_sparse_as_they_go():
    config = tinyprop.TinyPropConfig(policy="tinypropv2", budget=0.2, skip_split=0.0)
    model = toy_model(config)
    skipped = sum(stats.skipped for stats in train_steps(model, toy_stream(100)))
    assert skipped == 0  # k alone reaches 20% on this MLP
    assert abs(state_ratio(model) / 0.2 - 1) <= 0.10


@pytest.mark.parametrize("bad", [-0.1, 1.5, True, "half"])
def test_invalid_skip_split_is_refused(bad):
    with pytest.raises((ValueError, TypeError), match="skip_split"):
        tinyprop.TinyPropConfig(policy="tinypropv2", budget=0.2, skip_split=bad)


def batchnorm_model(config: tinyprop.TinyPropConfig) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(20, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 32), nn.BatchNorm1d(32),
        nn.ReLU(), nn.Linear(32, 5),
    )  # fmt: skip
    return tinyprop.apply(net, config)


def train_steps(model, batches, lr=0.01):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    return [tinyprop.train_step(model, x, y, LOSS, optimizer) for x, y in batches]


def state_ratio(model) -> float:
    return tinyprop.model.state_of(model).policy.budget.run_ratio


@pytest.mark.parametrize("drop", [False, True])
def test_drop_skipped_rows_leaves_skipped_samples_out_below_batchnorm(drop):
    config = tinyprop.TinyPropConfig(
        policy="tinypropv2", budget=0.5, skip_split=1.0, s_min=1.0, s_max=1.0, zeta=1.0,
        drop_skipped_rows=drop,
    )  # fmt: skip
    model = batchnorm_model(config)
    (stats,) = train_steps(model, toy_stream(1), lr=0.0)
    assert 0 < stats.skipped < 32
    rows = {name: keep.numel() for name, keep in stats.keep.items()}
    assert rows["6"] == stats.trained  # the output layer: skipped rows have δ = 0 anyway
    assert rows["0"] == (stats.trained if drop else 32)  # BatchNorm mixes them in below


@pytest.mark.parametrize("host_path", [True, False])
def test_drop_skipped_rows_gradient_is_the_trained_rows_part(host_path, monkeypatch):
    """Every entry kept (S_min = S_max = ζ = 1, c = 1 on the first step, half the samples trained
    with q0 = b): the first layer's weight gradient is plain autograd's on the masked loss with
    the skipped samples' rows of δ set to zero at every Linear layer. Both backward paths: the
    host's (rows left out) and the device's without host reads (rows masked to zero)."""
    monkeypatch.setattr(tinyprop.autograd, "HOST_DEVICES", ("cpu",) if host_path else ())
    config = tinyprop.TinyPropConfig(
        policy="tinypropv2", budget=0.5, skip_split=1.0, s_min=1.0, s_max=1.0, zeta=1.0,
        drop_skipped_rows=True, batch_norm_trained_rows=False,
    )  # fmt: skip
    model = batchnorm_model(config)
    x, y = next(toy_stream(1))
    model.zero_grad()
    output = model(x)
    stats = tinyprop.backward(model, LOSS(output, y), output)
    trained = stats.trained_mask.unsqueeze(1)  # (B, 1)
    assert 0 < int(trained.sum()) < len(y)
    reference = tinyprop.remove(copy.deepcopy(model))
    captured = {}

    def drop_skipped(index):
        def hook(grad):  # (B, N) δ of a Linear layer's output
            captured[index] = grad * trained
            return captured[index]

        return hook

    hidden = x
    for index, module in enumerate(reference):
        hidden = module(hidden)
        if isinstance(module, nn.Linear):
            hidden.register_hook(drop_skipped(index))
    (LOSS(hidden, y) * trained.squeeze(1) / len(y)).sum().backward()
    torch.testing.assert_close(model[0].weight.grad, captured[0].T @ x)
    second_input = reference[:3](x).detach()  # (B, 32)
    torch.testing.assert_close(model[3].weight.grad, captured[3].T @ second_input)


@pytest.mark.parametrize("host_path", [True, False])
def test_batch_norm_trained_rows_takes_the_means_over_the_trained_samples(host_path, monkeypatch):
    """Every entry kept, half the samples trained (as above): the input gradient of the
    BatchNorm is plain autograd's on the masked loss, dx, plus the skipped rows' share
    estimated by the trained rows', (N - K) / K · (dx - γ / σ · dy) (dy: the BatchNorm's
    output gradient), and zero on the skipped rows; γ's and β's gradients are plain autograd's."""
    monkeypatch.setattr(tinyprop.autograd, "HOST_DEVICES", ("cpu",) if host_path else ())
    config = tinyprop.TinyPropConfig(
        policy="tinypropv2", budget=0.5, skip_split=1.0, s_min=1.0, s_max=1.0, zeta=1.0
    )
    assert config.drop_skipped_rows and config.batch_norm_trained_rows
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 5))
    net[1].weight.data.uniform_(0.5, 1.5)  # γ != 1
    reference = copy.deepcopy(net)
    model = tinyprop.apply(net, config)
    x, y = next(toy_stream(1))
    output = model(x)
    stats = tinyprop.backward(model, LOSS(output, y), output)
    trained = stats.trained_mask.unsqueeze(1)  # (B, 1)
    rows, count = int(trained.sum()), len(y)
    assert 0 < rows < count
    captured = {}
    normalised_input = reference[0](x)  # (B, 32)
    normalised_input.register_hook(lambda grad: captured.setdefault("dx", grad))
    normalised = reference[1](normalised_input)
    normalised.register_hook(lambda grad: captured.setdefault("dy", grad))
    logits = reference[3](reference[2](normalised))
    (LOSS(logits, y) * trained.squeeze(1) / count).sum().backward()
    scale = reference[1].weight.detach() / torch.sqrt(
        normalised_input.detach().var(0, unbiased=False) + reference[1].eps
    )  # (32,) γ / σ
    dx, dy = captured["dx"], captured["dy"]
    expected = (dx + (count - rows) / rows * (dx - scale * dy)) * trained  # (B, 32)
    torch.testing.assert_close(model[0].weight.grad, expected.T @ x)
    torch.testing.assert_close(model[0].bias.grad, expected.sum(0))
    torch.testing.assert_close(model[1].weight.grad, reference[1].weight.grad)
    torch.testing.assert_close(model[1].bias.grad, reference[1].bias.grad)
    torch.testing.assert_close(model[1].running_mean, reference[1].running_mean)
    torch.testing.assert_close(model[1].running_var, reference[1].running_var)


@pytest.mark.parametrize("kind", [nn.BatchNorm1d, nn.BatchNorm2d])
def test_batch_norm_trained_rows_is_plain_batch_norm_when_no_sample_is_skipped(kind):
    """Outside a tinyprop step (or with every sample trained) the swapped BatchNorm computes
    PyTorch's gradients and running statistics; remove() gives the plain class back."""
    torch.manual_seed(0)
    plain = kind(3)
    plain.weight.data.uniform_(0.5, 1.5)
    swapped = copy.deepcopy(plain)
    conv = nn.Conv1d(3, 3, 1) if kind is nn.BatchNorm1d else nn.Conv2d(3, 3, 1)
    model = tinyprop.apply(
        nn.Sequential(conv, swapped), tinyprop.TinyPropConfig(policy="tinypropv2", budget=0.2)
    )
    assert type(model[1]).__name__ == f"TinyProp{kind.__name__}"
    x = torch.randn(6, 3, 5) if kind is nn.BatchNorm1d else torch.randn(6, 3, 4, 4)
    x.requires_grad_(True)
    dy = torch.randn_like(x)
    reference_x = x.detach().clone().requires_grad_(True)
    torch.autograd.backward(model[1](x), dy)
    torch.autograd.backward(plain(reference_x), dy)
    torch.testing.assert_close(x.grad, reference_x.grad)
    for name in ("weight", "bias"):
        torch.testing.assert_close(getattr(swapped, name).grad, getattr(plain, name).grad)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(swapped, name), getattr(plain, name))
    keys = set(model.state_dict())
    tinyprop.remove(model)
    assert type(model[1]) is kind and not hasattr(model[1], "tinyprop_state")
    assert set(model.state_dict()) <= keys


def test_batch_norm_is_swapped_only_with_the_setting():
    for config, swapped in (
        (tinyprop.TinyPropConfig(policy="tinypropv2"), False),
        (tinyprop.TinyPropConfig(policy="tinypropv2", budget=0.2), True),
        (tinyprop.TinyPropConfig(policy="topk", budget=0.2), True),  # its forward stays plain
        (tinyprop.TinyPropConfig(budget=0.2, batch_norm_trained_rows=False), False),
        (tinyprop.TinyPropConfig(drop_skipped_rows=True), True),
    ):
        model = batchnorm_model(config)
        assert (type(model[1]) is not nn.BatchNorm1d) == swapped, config


def test_budget_defaults_zeta_one_and_dropped_skipped_rows_and_keeps_what_is_given():
    assert tinyprop.TinyPropConfig().zeta == 0.5  # the authors' setting without a budget
    assert tinyprop.TinyPropConfig(budget=0.1).zeta == 1.0
    assert tinyprop.TinyPropConfig(budget=0.1, zeta=0.5).zeta == 0.5
    assert tinyprop.TinyPropConfig(zeta=0.75).zeta == 0.75
    assert not tinyprop.TinyPropConfig().drop_skipped_rows
    assert tinyprop.TinyPropConfig(budget=0.1).drop_skipped_rows
    assert not tinyprop.TinyPropConfig(budget=0.1, drop_skipped_rows=False).drop_skipped_rows
    assert not tinyprop.TinyPropConfig(budget=0.1).skip_zero_entries
    assert tinyprop.TinyPropConfig(budget=0.1).batch_norm_trained_rows
    assert not tinyprop.TinyPropConfig().batch_norm_trained_rows  # as drop_skipped_rows
    assert not tinyprop.TinyPropConfig(budget=0.1, drop_skipped_rows=False).batch_norm_trained_rows
    assert tinyprop.TinyPropConfig(budget=0.1).dense_output_layer is None  # dense when cheap
    assert tinyprop.TinyPropConfig().dense_output_layer is False


def keep_of_one_step(model) -> dict:
    """Layer name -> (R,) k of each backpropagated row, for one toy batch."""
    x, y = next(toy_stream(1))
    output = model(x)
    return tinyprop.backward(model, LOSS(output, y), output).keep


@pytest.mark.parametrize("policy", ["topk", "tinypropv2"])
def test_a_cheap_output_layer_is_dense_under_a_budget_and_an_expensive_one_sparse(policy):
    config = tinyprop.TinyPropConfig(policy=policy, budget=0.2, skip_split=0.0)
    keep = keep_of_one_step(toy_model(config))  # output layer 64 -> 5: 6.8% of the backward
    assert (keep["4"] == 5).all() and (keep["2"] < 64).all()
    torch.manual_seed(0)  # an autoencoder-like net whose output layer is most of the backward
    wide = nn.Sequential(nn.Linear(20, 8), nn.ReLU(), nn.Linear(8, 400))
    assert (keep_of_one_step(tinyprop.apply(wide, config))["2"] < 400).all()
    sparse = config.replace(dense_output_layer=False)  # what is given is kept
    assert (keep_of_one_step(toy_model(sparse))["4"] < 5).all()


@pytest.mark.parametrize("policy", ["topk", "tinyprop"])
def test_skip_zero_entries_gives_the_same_gradients_for_fewer_macs(policy):
    """Every entry asked for (k = N): with the cap, a row keeps only its non-zero entries of δ
    (ReLU zeroes many), the gradients are the same and the backward MACs fewer."""
    every = {"ratio": 1.0} if policy == "topk" else {"s_min": 1.0, "s_max": 1.0, "zeta": 1.0}
    runs = {}
    for cap in (False, True):
        config = tinyprop.TinyPropConfig(policy=policy, skip_zero_entries=cap, **every)
        model = toy_model(config)
        x, y = next(toy_stream(1))
        stats = tinyprop.backward(model, LOSS(model(x), y))
        runs[cap] = ([p.grad.clone() for p in model.parameters()], stats)
    for capped, uncapped in zip(runs[True][0], runs[False][0], strict=True):
        torch.testing.assert_close(capped, uncapped)
    capped, uncapped = runs[True][1], runs[False][1]
    assert capped.macs.backward < uncapped.macs.backward
    assert capped.macs.selection > uncapped.macs.selection  # the non-zero entries counted
    hidden = capped.keep["2"]  # behind a ReLU: fewer than the 64 entries kept
    assert (hidden <= 64).all() and (hidden < 64).any()


def test_skip_zero_entries_holds_the_budget_without_winding_up_the_keep_scale():
    """Rows that kept all their non-zero entries count as saturated: c stops rising there
    (it would otherwise climb to its cap of 1e4 while k stays at nnz)."""
    config = tinyprop.TinyPropConfig(policy="tinypropv2", budget=0.1, skip_zero_entries=True)
    model = toy_model(config)
    ledgers = run(model, toy_stream(300))
    assert abs(ratio(ledgers) / 0.1 - 1) <= 0.10
    assert tinyprop.model.state_of(model).policy.budget.keep_scale < 10


def test_the_controller_moves_c_and_q_at_most_twofold_per_step():
    """Small batches often train no sample at all; c must not wind up on such steps."""
    config = tinyprop.TinyPropConfig(policy="tinypropv2", budget=0.1)
    model = toy_model(config)
    controller = tinyprop.model.state_of(model).policy.budget
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    previous = (controller.keep_scale, controller.trained_share)
    for x, y in toy_stream(80, batch=4):
        tinyprop.train_step(model, x, y, LOSS, optimizer)
        now = (controller.keep_scale, controller.trained_share)
        change = sum(abs(math.log(a / b)) for a, b in zip(now, previous, strict=True))
        assert change <= math.log(2) + 1e-9
        previous = now


def test_a_policy_that_trains_every_sample_keeps_the_output_layer_dense_only_below_half_b():
    """6.8% of the backward: above b / 2 = 5% at b = 0.1 for top-k (it could not skip to pay
    for it), dense for TinyPropv2, which skips more samples instead."""
    for policy, dense in (("topk", False), ("tinypropv2", True)):
        config = tinyprop.TinyPropConfig(policy=policy, budget=0.1, skip_split=0.0)
        assert bool((keep_of_one_step(toy_model(config))["4"] == 5).all()) == dense


@pytest.mark.parametrize("mean_over_trained", [False, True])
def test_mean_over_trained_divides_the_step_loss_by_the_trained_samples(mean_over_trained):
    """Every entry kept, half the samples trained: the gradient is plain autograd's on the
    trained samples' losses summed and divided by K (``mean_over_trained``) or by B."""
    config = tinyprop.TinyPropConfig(
        policy="tinypropv2", budget=0.5, skip_split=1.0, s_min=1.0, s_max=1.0, zeta=1.0,
        mean_over_trained=mean_over_trained,
    )  # fmt: skip
    model = toy_model(config)
    reference = tinyprop.remove(copy.deepcopy(model))
    x, y = next(toy_stream(1))
    output = model(x)
    losses = LOSS(output, y)
    stats = tinyprop.backward(model, losses, output)
    trained = stats.trained_mask
    assert 0 < stats.trained < len(y)
    expected = (LOSS(reference(x), y) * trained).sum() / (
        stats.trained if mean_over_trained else len(y)
    )
    expected.backward()
    for sparse, dense in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(sparse.grad, dense.grad)


def test_mean_over_trained_is_the_batch_mean_when_nothing_is_skipped():
    x, y = next(toy_stream(1))
    grads = []
    for mean_over_trained in (False, True):
        config = tinyprop.TinyPropConfig(policy="tinyprop", mean_over_trained=mean_over_trained)
        model = toy_model(config)
        output = model(x)
        tinyprop.backward(model, LOSS(output, y), output)
        grads.append([p.grad for p in model.parameters()])
    for first, second in zip(*grads, strict=True):
        torch.testing.assert_close(first, second)


@pytest.mark.parametrize("per_batch", [False, True])
def test_running_max_per_batch_measures_every_row_against_the_batch_maximum(per_batch):
    """The output layer's k on a fresh model: α = Y / Ymax with Ymax the cumulative maximum in
    batch order, or (``running_max_per_batch``) the batch's largest Y for every row."""
    config = tinyprop.TinyPropConfig(
        policy="tinyprop", zeta=1.0, s_min=0.1, s_max=0.9, running_max_per_batch=per_batch
    )
    model = toy_model(config)
    x, y = next(toy_stream(1))
    output = model(x)
    stats = tinyprop.backward(model, LOSS(output, y), output)
    delta = torch.softmax(output.detach().double(), 1) - nn.functional.one_hot(y, 5)  # (B, 5)
    error = delta.abs().sum(1)  # (B,) Y_L per unit of one sample's loss
    error_max = error.max().expand_as(error) if per_batch else torch.cummax(error, 0).values
    expected = tinyprop.functional.keep_count(0.1 + error / error_max * 0.8, 5)
    assert torch.equal(stats.keep["4"].cpu(), expected)
    sequential = tinyprop.functional.keep_count(
        0.1 + error / torch.cummax(error, 0).values * 0.8, 5
    )
    assert torch.equal(stats.keep["4"].cpu(), sequential) != per_batch


@pytest.mark.parametrize("field", ["mean_over_trained", "running_max_per_batch"])
def test_export_refuses_what_the_c_runtime_does_not_do(field, tmp_path):
    from tinyprop.export import export_c

    config = tinyprop.TinyPropConfig(policy="tinypropv2", **{field: True})
    net = nn.Sequential(nn.Linear(20, 8), nn.ReLU(), nn.Linear(8, 5))
    with pytest.raises(ValueError, match=f"{field}=False"):
        export_c(net, config, tmp_path, input_shape=(20,))
    with pytest.raises(TypeError, match=field):
        tinyprop.TinyPropConfig(policy="tinypropv2", **{field: 1})
