"""tinyprop.backward / tinyprop.loss in your own loop: plain PyTorch's gradient at ratio 1.0,
gradient accumulation, GradScaler, clipping and schedulers, plain loss.backward() (float64)."""

import copy
import warnings

import pytest
import torch
from core_models import BUILDERS, batch, build
from torch import nn

import tinyprop
from tinyprop import autograd
from tinyprop.model import state_of

LOSS = nn.CrossEntropyLoss(reduction="none")
KEEP_ALL = tinyprop.TinyPropConfig(policy="topk", ratio=1.0)


def gradients(model) -> dict:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def buffers(model, only_maxima=False) -> dict:
    """Running maxima Ymax_l, Ymax_L and (unless ``only_maxima``) the backward counters."""
    names = ("error_max",) if only_maxima else ("error_max", "backward_steps")
    return {n: value.clone() for n, value in model.named_buffers() if n.endswith(names)}


def assert_same(got: dict, expected: dict, atol=1e-10) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=atol, msg=key)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_backward_at_ratio_one_equals_mean_backward_and_accumulates(name):
    plain = build(name)
    model = tinyprop.apply(copy.deepcopy(plain), KEEP_ALL)
    x, y = batch(name, size=6)
    LOSS(plain(x), y).mean().backward()
    expected = gradients(plain)
    stats = tinyprop.backward(model, LOSS(model(x), y))
    assert (stats.trained, stats.skipped, stats.stepped) == (6, 0, False)
    assert_same(gradients(model), expected)
    # a second call adds to .grad (no zeroing), as a second loss.backward() would
    tinyprop.backward(model, LOSS(model(x), y))
    assert_same(gradients(model), {key: 2 * value for key, value in expected.items()})


ACCUMULATED = [
    tinyprop.TinyPropConfig(policy="topk", ratio=0.3),
    tinyprop.TinyPropConfig(policy="tinyprop"),
    tinyprop.TinyPropConfig(policy="tinypropv2", skip_threshold=0.95),
]


@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("config", ACCUMULATED, ids=lambda config: config.policy)
@pytest.mark.parametrize("way", ["backward(scale=1/2)", "(loss/2).backward()"])
def test_two_calls_on_halves_equal_one_call_on_the_batch(name, config, way):
    """Two steps: per sample, k, the skip decision and the running maxima do not depend on how
    the batch is split, so halves scaled by 1/2 give the whole batch's gradient exactly."""
    whole = tinyprop.apply(build(name), config)
    halves = copy.deepcopy(whole)
    for step in range(2):
        x, y = batch(name, size=8, seed=step)
        whole.zero_grad()
        expected = tinyprop.backward(whole, LOSS(whole(x), y))
        halves.zero_grad()
        trained = []
        for part in (slice(0, 4), slice(4, 8)):
            losses = LOSS(halves(x[part]), y[part])
            if way == "backward(scale=1/2)":
                trained.append(tinyprop.backward(halves, losses, scale=0.5).trained_mask)
            else:
                (tinyprop.loss(halves, losses) / 2).backward()
                trained.append(tinyprop.step_stats(halves).trained_mask)
        assert torch.cat(trained).tolist() == expected.trained_mask.tolist()
        assert_same(gradients(halves), gradients(whole))
        assert_same(buffers(halves, only_maxima=True), buffers(whole, only_maxima=True))
    if config.skips:
        assert 0 < expected.trained < 8  # the decision did skip some samples


@pytest.mark.parametrize("config", [tinyprop.preset("full"), KEEP_ALL], ids=["full", "topk"])
def test_forward_passes_of_micro_batches_first_then_one_backward_each(config):
    """The micro-batches' forward passes run first, then ``tinyprop.backward(..., scale=1/2)``
    for each: plain PyTorch's gradient of the whole batch, and the whole batch's ledger
    (the first step counts both forward passes). Under ``full`` the second backward raised
    ValueError ("the losses come from another model"): no forward pass since the last step."""
    plain = build("mlp")
    model = tinyprop.apply(copy.deepcopy(plain), config)
    whole = copy.deepcopy(model)
    x, y = batch("mlp", size=8)
    LOSS(plain(x), y).mean().backward()
    expected = tinyprop.backward(whole, LOSS(whole(x), y)).macs
    outputs = [model(x[part]) for part in (slice(0, 4), slice(4, 8))]
    ledger = tinyprop.Ledger()
    for output, part in zip(outputs, (slice(0, 4), slice(4, 8)), strict=True):
        ledger += tinyprop.backward(model, LOSS(output, y[part]), scale=0.5).macs
    assert_same(gradients(model), gradients(plain))
    assert ledger == expected


def test_scale_must_be_positive_and_finite():
    model = tinyprop.apply(build("mlp"), KEEP_ALL)
    x, y = batch("mlp")
    for scale in (0.0, -1.0, float("inf"), "0.5"):
        with pytest.raises(ValueError, match="scale must be a positive finite number"):
            tinyprop.backward(model, LOSS(model(x), y), scale=scale)


def run_loop(way: str, steps=4):
    """tinypropv2 (skipping some samples) trained with SGD, scaled or not by a GradScaler."""
    config = tinyprop.TinyPropConfig(policy="tinypropv2", skip_threshold=0.95)
    model = tinyprop.apply(build("mlp"), config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    trained = []
    for step in range(steps):
        x, y = batch("mlp", size=8, seed=step)
        optimizer.zero_grad()
        losses = LOSS(model(x), y)
        if way == "unscaled":
            stats = tinyprop.backward(model, losses)
            if stats.trained:
                optimizer.step()
        elif way == "grad_scaler=":
            stats = tinyprop.backward(model, losses, grad_scaler=scaler)
            if stats.trained:  # GradScaler asserts on an optimizer without gradients
                scaler.step(optimizer)
                scaler.update()
        else:  # scaler.scale(tinyprop.loss(...)).backward(): the backward always runs
            scaler.scale(tinyprop.loss(model, losses)).backward()
            scaler.step(optimizer)
            scaler.update()
            stats = tinyprop.step_stats(model)
        trained.append(stats.trained_mask.tolist())
    return model, trained


@pytest.mark.parametrize("way", ["grad_scaler=", "scaler.scale(loss)"])
def test_grad_scaler_gives_the_unscaled_update_and_running_maxima(way):
    expected, expected_trained = run_loop("unscaled")
    got, trained = run_loop(way)
    assert trained == expected_trained
    assert 0 < sum(map(sum, trained)) < 4 * 8  # some samples skipped, some trained
    assert_same(dict(got.named_parameters()), dict(expected.named_parameters()))
    assert_same(buffers(got), buffers(expected))  # Ymax_l, Ymax_L, backward counters


def fp16_scaler_loop(config, way: str, steps: int = 6):
    """Autocast float16 with a GradScaler whose first scales overflow float16's δ: per step,
    whether the scaler skipped it, and whether the weights and tinyprop's buffers moved."""
    torch.manual_seed(0)
    model = tinyprop.apply(build("mlp").float(), config)  # float16 forward, float32 weights
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)
    history, seen = [], []
    for step in range(steps):
        x, y = batch("mlp", size=8, seed=step)
        before = (copy.deepcopy(dict(model.named_parameters())), buffers(model))
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            output = model(x.float())
        losses = LOSS(output.float(), y)
        scale = scaler.get_scale()
        if way == "grad_scaler=":
            tinyprop.backward(model, losses, grad_scaler=scaler)
        else:
            scaler.scale(tinyprop.loss(model, losses)).backward()
        # this step's stats, also when it overflowed (step_stats gave the step before it)
        stats = tinyprop.step_stats(model)
        assert stats is not None and all(stats is not earlier for earlier in seen)
        seen.append(stats)
        scaler.step(optimizer)
        scaler.update()
        moved = [
            any(not torch.equal(a, b) for a, b in zip(old.values(), new.values(), strict=True))
            for old, new in zip(
                before, (dict(model.named_parameters()), buffers(model)), strict=True
            )
        ]
        history.append((scaler.get_scale() < scale, *moved))
    return history


@pytest.mark.parametrize("way", ["grad_scaler=", "scaler.scale(loss)"])
@pytest.mark.parametrize("config", [KEEP_ALL, tinyprop.TinyPropConfig(policy="tinypropv2")],
                         ids=["topk-1.0", "tinypropv2"])  # fmt: skip
@pytest.mark.parametrize("host_path", [True, False], ids=["host", "device"])
def test_a_grad_scaler_overflow_skips_the_step_and_leaves_the_running_state(
    way, config, host_path, monkeypatch
):
    """float16 with a GradScaler: a scale that overflows δ is the scaler's signal to skip the
    step and halve the scale. It raised FloatingPointError (a NaN δ) at the first such step;
    now the overflow reaches the gradients, the scaler skips the step, and the weights and
    the running maxima stay as they were; the steps after it train."""
    monkeypatch.setattr(autograd, "HOST_DEVICES", ("cpu",) if host_path else ())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = fp16_scaler_loop(config, way)
    skipped = [entry for entry in history if entry[0]]
    assert skipped and len(skipped) < len(history)
    assert all(entry == (True, False, False) for entry in skipped)
    assert history[-1] == (False, True, True)
    warned = [w for w in caught if "passed on to the gradients" in str(w.message)]
    assert len(warned) == (0 if way == "grad_scaler=" else 1)


@pytest.mark.parametrize("way", ["grad_scaler=", "scaler.scale(loss)"])
def test_a_loss_overflowed_in_a_float16_forward_is_left_to_the_grad_scaler(way):
    """A float16 forward that overflows makes a loss NaN or infinite. Under a GradScaler it
    goes on into the gradients, the scaler skips the step and halves its scale, as in plain
    PyTorch (it raised FloatingPointError, ending the loop: Lightning's 16-mixed backward is
    the second way); the weights and tinyprop's running state stay as they were, and the
    next batch trains."""
    torch.manual_seed(0)
    model = tinyprop.apply(build("mlp").float(), tinyprop.TinyPropConfig(policy="tinypropv2"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for step, overflow in enumerate([False, True, False]):
        x, y = batch("mlp", size=8, seed=step)
        if overflow:
            x[0] = 1e6  # past float16's largest value (65504) in the first layer
        before = (copy.deepcopy(dict(model.named_parameters())), buffers(model))
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            output = model(x.float())
        losses = LOSS(output.float(), y)
        assert bool((~torch.isfinite(losses)).any()) == overflow
        scale = scaler.get_scale()
        if way == "grad_scaler=":
            tinyprop.backward(model, losses, grad_scaler=scaler)
        else:
            scaler.scale(tinyprop.loss(model, losses)).backward()
        scaler.step(optimizer)
        scaler.update()
        assert (scaler.get_scale() < scale) == overflow
        moved = [
            any(not torch.equal(a, b) for a, b in zip(old.values(), new.values(), strict=True))
            for old, new in zip(
                before, (dict(model.named_parameters()), buffers(model)), strict=True
            )
        ]
        assert moved == [not overflow, not overflow]


def test_a_nan_loss_through_tinyprop_loss_without_a_scaler_raises_at_its_backward():
    """Without a GradScaler, tinyprop.loss's backward raises FloatingPointError naming the
    samples before any gradient is written."""
    model = tinyprop.apply(build("mlp").float(), tinyprop.TinyPropConfig(policy="tinypropv2"))
    x, y = batch("mlp", size=8, seed=0)
    x[3] = float("nan")
    scalar = tinyprop.loss(model, LOSS(model(x.float()), y))
    with pytest.raises(FloatingPointError, match=r"NaN or infinite for samples \[3\]"):
        scalar.backward()
    assert all(parameter.grad is None for parameter in model.parameters())


def test_clipping_and_scheduler_in_own_loop_equal_plain_pytorch():
    plain = build("cnn")
    model = tinyprop.apply(copy.deepcopy(plain), KEEP_ALL)
    results = []
    for net, use_tinyprop in ((plain, False), (model, True)):
        optimizer = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
        norms = []
        for step in range(5):
            x, y = batch("cnn", size=6, seed=step)
            optimizer.zero_grad()
            losses = LOSS(net(x), y)
            if use_tinyprop:
                tinyprop.backward(net, losses)
            else:
                losses.mean().backward()
            norms.append(float(nn.utils.clip_grad_norm_(net.parameters(), max_norm=0.05)))
            optimizer.step()
            scheduler.step()
        results.append((dict(net.named_parameters()), norms))
    (expected, expected_norms), (got, got_norms) = results
    assert min(expected_norms) > 0.05  # the clipping did act
    assert got_norms == pytest.approx(expected_norms, rel=0, abs=1e-10)
    assert_same(got, expected)


def test_train_step_zeroes_parameters_outside_the_optimizer():
    """A parameter left out of the optimizer holds the last step's gradient, never a sum."""
    plain = build("mlp")
    model = tinyprop.apply(copy.deepcopy(plain), KEEP_ALL)
    optimizer = torch.optim.SGD(model[4].parameters(), lr=0.5)  # only the last layer
    for step in range(3):
        x, y = batch("mlp", seed=step)
        with torch.no_grad():
            for mine, theirs in zip(plain.parameters(), model.parameters(), strict=True):
                mine.copy_(theirs)
        plain.zero_grad()
        LOSS(plain(x), y).mean().backward()
        tinyprop.train_step(model, x, y, LOSS, optimizer)
        torch.testing.assert_close(model[0].weight.grad, plain[0].weight.grad, rtol=0, atol=1e-10)


def plain_backward(model, seed=0):
    x, y = batch("mlp", seed=seed)
    LOSS(model(x), y).mean().backward()


def test_plain_backward_warns_once_for_tinypropv2():
    model = tinyprop.apply(build("mlp"), tinyprop.TinyPropConfig(policy="tinypropv2"))
    with pytest.warns(UserWarning, match="no sample is skipped") as caught:
        plain_backward(model)
        plain_backward(model, seed=1)
    assert len([w for w in caught if "no sample is skipped" in str(w.message)]) == 1
    assert model[0].weight.grad is not None


@pytest.mark.parametrize("policy", ["topk", "randomk", "tinyprop", "tinypropv2"])
def test_no_warning_through_tinyprop_loss(policy):
    model = tinyprop.apply(build("mlp"), tinyprop.TinyPropConfig(policy=policy))
    x, y = batch("mlp")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tinyprop.loss(model, LOSS(model(x), y)).backward()
        if policy != "tinypropv2":
            plain_backward(model)  # only tinypropv2 loses something in a plain backward


def test_plain_backward_with_topk_keeps_the_same_entries_as_tinyprop_backward():
    """topk / randomk select per row of each layer: a plain mean-loss backward gives the same
    sparse gradient as tinyprop.backward (only the skip decision needs tinyprop.loss)."""
    config = tinyprop.TinyPropConfig(policy="topk", ratio=0.25)
    model = tinyprop.apply(build("cnn"), config)
    reference = copy.deepcopy(model)
    x, y = batch("cnn")
    LOSS(model(x), y).mean().backward()
    tinyprop.backward(reference, LOSS(reference(x), y))
    assert_same(gradients(model), gradients(reference))


def test_warns_once_when_distributed_without_ddp(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    model = tinyprop.apply(build("mlp"), KEEP_ALL)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = batch("mlp")
    with pytest.warns(UserWarning, match="not wrapped in DistributedDataParallel") as caught:
        tinyprop.train_step(model, x, y, LOSS, optimizer)
        tinyprop.backward(model, LOSS(model(x), y))
    assert len([w for w in caught if "DistributedDataParallel" in str(w.message)]) == 1


class TwoOutputs(nn.Module):
    """Returns its hidden features and the logits computed from them (and a second head)."""

    def __init__(self, returns: str):
        super().__init__()
        self.returns = returns
        self.body, self.head, self.other = nn.Linear(12, 16), nn.Linear(16, 5), nn.Linear(16, 5)

    def forward(self, x):
        hidden = torch.relu(self.body(x))
        outputs = {"features": hidden, "scores": self.head(hidden), "other": self.other(hidden)}
        if self.returns == "tuple":
            return outputs["features"], outputs["scores"], outputs["other"]
        return outputs


@pytest.mark.parametrize("returns", ["tuple", "dict"])
def test_tuple_output_finds_the_tensor_the_losses_come_from(returns):
    torch.manual_seed(0)
    model = tinyprop.apply(TwoOutputs(returns).double(), tinyprop.TinyPropConfig())
    named = copy.deepcopy(model)  # told the output
    x, y = batch("mlp")
    scores = lambda out: out[1] if returns == "tuple" else out["scores"]  # noqa: E731
    for _ in range(3):  # the second and third steps read Ymax_L of the first
        stats = tinyprop.backward(model, LOSS(scores(model(x)), y))
        out = named(x)
        expected = tinyprop.backward(named, LOSS(scores(out), y), output=scores(out))
        assert torch.equal(stats.trained_mask, expected.trained_mask)
        assert_same(buffers(model), buffers(named))  # Y_L of the features before
    for heads in ("both", "none"):  # two heads side by side, or no output tensor at all
        out = model(x)
        losses = LOSS(scores(out), y)
        if heads == "both":
            other = out[2] if returns == "tuple" else out["other"]
            losses = losses + LOSS(other, y)
        else:
            losses = LOSS(model.head.weight[:, :1].T.expand(6, 5), y)  # not from the output
        with pytest.raises(ValueError, match="pass it: tinyprop.backward.*output="):
            tinyprop.loss(model, losses)


class TwoHeadsSideBySide(TwoOutputs):
    """TwoOutputs' two heads as one output, side by side: (B, 10)."""

    def forward(self, x):
        hidden = torch.relu(self.body(x))
        return torch.cat([self.head(hidden), self.other(hidden)], dim=1)


def test_several_heads_decide_as_one_output_of_the_heads_side_by_side():
    """``output=(logits_a, logits_b)``, their losses summed: tinypropv2's Y_L of a sample is
    Σ |δ_L| over both heads' elements, the output error of the heads as one output layer, and
    the steps (skips, gradients, running maxima) are those of a model whose output is the two
    heads side by side. It was a ValueError (output= must be one tensor)."""
    torch.manual_seed(0)
    config = tinyprop.TinyPropConfig(policy="tinypropv2", skip_threshold=0.95)
    model = tinyprop.apply(TwoOutputs("tuple").double(), config)
    side_by_side = tinyprop.apply(TwoHeadsSideBySide("tuple").double(), config)
    side_by_side.load_state_dict(model.state_dict())
    skipped = 0
    for step in range(4):  # the later steps read Ymax_L of the earlier ones
        x, y = batch("mlp", size=8, seed=step)
        model.zero_grad()
        side_by_side.zero_grad()
        _, scores, other = model(x)
        stats = tinyprop.backward(model, LOSS(scores, y) + LOSS(other, y), output=(scores, other))
        both = side_by_side(x)
        expected = tinyprop.backward(side_by_side, LOSS(both[:, :5], y) + LOSS(both[:, 5:], y))
        assert torch.equal(stats.trained_mask, expected.trained_mask)
        assert stats.macs == expected.macs
        assert_same(gradients(model), gradients(side_by_side))
        assert_same(buffers(model), buffers(side_by_side))
        skipped += stats.skipped
    assert 0 < skipped < 32  # the decision did skip some samples, not all
    _, scores, other = model(x)
    with pytest.raises(ValueError, match="do not depend on the output"):  # a head left out
        tinyprop.backward(model, LOSS(scores, y), output=(scores, other))


def test_losses_of_several_forward_passes_say_what_to_do():
    """Two forward passes, their losses concatenated (or the first pass's only): tinypropv2
    named only sample_dim (or said 'the given output' of a call that gave none); one
    tinyprop.backward per pass with scale=1/2 is the way, and gives the gradient of the batch."""
    torch.manual_seed(0)
    model = tinyprop.apply(build("mlp"), tinyprop.TinyPropConfig(policy="tinypropv2"))
    x, y = batch("mlp", size=8)
    first, second = model(x[:4]), model(x[4:])
    with pytest.raises(ValueError, match="one tinyprop.backward per pass"):
        tinyprop.loss(model, torch.cat([LOSS(first, y[:4]), LOSS(second, y[4:])]))
    first, second = model(x[:4]), model(x[4:])
    with pytest.raises(ValueError, match="last forward pass.*output="):
        tinyprop.loss(model, LOSS(first, y[:4]))
    keep_all = tinyprop.apply(build("mlp"), KEEP_ALL)
    plain = build("mlp")
    for half in (slice(0, 4), slice(4, 8)):
        tinyprop.backward(keep_all, LOSS(keep_all(x[half]), y[half]), scale=0.5)
    LOSS(plain(x), y).mean().backward()
    assert_same(gradients(keep_all), gradients(plain))


def test_sequence_first_output_with_as_many_steps_as_samples_needs_sample_dim():
    """A (T, B, C) output with T = B passed the shape check with the default sample_dim=0:
    tinypropv2 then ranked time steps as if they were samples, silently."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
    model = nn.Sequential(nn.TransformerEncoder(layer, 1), nn.Linear(8, 3)).double()
    tinyprop.apply(model, tinyprop.TinyPropConfig(policy="tinypropv2"))
    x = torch.randn(4, 4, 8, dtype=torch.float64)  # (T, B, D), T = B = 4
    y = torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match="sample_dim=.*sequence-first"):
        tinyprop.loss(model, LOSS(model(x).mean(0), y))  # loss n comes from output[:, n]
    assert tinyprop.backward(model, LOSS(model(x).mean(0), y), sample_dim=1).trained == 4
    batch_first = model(x).transpose(0, 1)  # (B, T, C), also 4 x 4: no false alarm
    stats = tinyprop.backward(model, LOSS(batch_first.mean(1), y), output=batch_first)
    assert stats.trained == 4


def test_output_before_a_sparse_layer_leaves_the_layers_alone():
    """output= features before a sparse head: the decision's gradient ran the head's sparse
    backward outside the step (a 'did not start from tinyprop.loss' warning, its backward
    count and running maximum moved); now it is a plain dense gradient. The step itself is
    the same as with output= the logits, up to Y_L of the features."""
    torch.manual_seed(0)
    model = tinyprop.apply(build("mlp"), tinyprop.TinyPropConfig(policy="tinypropv2"))
    x, y = batch("mlp")
    features = {}
    model[3].register_forward_hook(lambda module, args, out: features.update(out=out))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats = tinyprop.backward(model, LOSS(model(x), y), output=features["out"])
    assert stats.trained == 6
    assert [int(layer.backward_steps) for layer in (model[0], model[2], model[4])] == [1, 1, 1]


@pytest.mark.parametrize("policy", ["full", "topk", "tinypropv2"])
def test_a_second_backward_of_one_step_loss_is_counted(policy):
    """``l = tinyprop.loss(...)``; ``l.backward(retain_graph=True)``; ``l.backward()``: the
    gradients were summed, but the ledger held the first backward only. Now the second adds
    its backward, selection and dense backward (not the forward or the skip decision); the
    running maxima are those of one backward (the same errors)."""
    model = tinyprop.apply(build("mlp"), tinyprop.TinyPropConfig(policy=policy, ratio=0.5))
    x, y = batch("mlp", size=8)
    step_loss = tinyprop.loss(model, LOSS(model(x), y))
    step_loss.backward(retain_graph=True)
    first = copy.deepcopy(tinyprop.step_stats(model).macs)
    once, maxima = gradients(model), buffers(model, only_maxima=True)
    step_loss.backward()
    both = tinyprop.step_stats(model).macs
    if policy != "tinypropv2":  # TinyProp's k follows Ymax_l, which the first backward raised
        assert_same(gradients(model), {name: 2 * grad for name, grad in once.items()})
    assert_same(buffers(model, only_maxima=True), maxima, atol=0)
    decision = state_of(model).policy.decision_macs(8, 5) if policy == "tinypropv2" else 0
    assert both.forward == first.forward > 0
    if policy == "tinypropv2":  # fewer entries kept the second time (a higher Ymax_l)
        assert first.backward < both.backward <= 2 * first.backward
    else:
        assert both.backward == 2 * first.backward > 0
    assert both.backward_dense == 2 * first.backward_dense
    assert both.selection == 2 * first.selection - decision


def test_one_logit_per_sample_squeezed_to_b_trains_as_the_unsqueezed_output():
    """A binary classifier whose output is squeezed to (B,) (``nn.Flatten(0)``, or
    ``.squeeze(-1)`` before ``binary_cross_entropy_with_logits``): tinypropv2's skip decision
    raised IndexError (Dimension out of range); it now decides and trains as for the (B, 1)
    output."""
    config = tinyprop.TinyPropConfig(policy="tinypropv2", skip_threshold=0.95)
    x = torch.randn(16, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    target = (x[:, 0] > 0).double()
    results = []
    for squeeze in (False, True):
        torch.manual_seed(0)
        layers = [nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 1)] + [nn.Flatten(0)] * squeeze
        model = tinyprop.apply(nn.Sequential(*layers).double(), config)
        output = model(x)
        losses = nn.functional.binary_cross_entropy_with_logits(
            output.reshape(16), target, reduction="none"
        )
        stats = tinyprop.backward(model, losses)
        results.append((stats.trained_mask, gradients(model)))
    assert 0 < int(results[0][0].sum()) < 16  # some samples skipped
    assert torch.equal(results[0][0], results[1][0])
    assert_same(results[1][1], results[0][1], atol=0)


def test_token_losses_get_told_how_to_make_one_loss_per_sample():
    """(B, T) losses (reduction='none' over tokens) were told to use reduction='none', which
    they had: now how to reduce each sample's losses to one."""
    model = tinyprop.apply(nn.Sequential(nn.Linear(6, 5)), tinyprop.TinyPropConfig())
    x, y = torch.randn(4, 7, 6), torch.randint(0, 5, (4, 7))
    losses = LOSS(model(x).transpose(1, 2), y)  # (4, 7)
    with pytest.raises(ValueError, match=r"shape \(4, 7\); reduce each sample's losses"):
        tinyprop.backward(model, losses)
    token_loss = lambda output, labels: LOSS(output.transpose(1, 2), labels)  # noqa: E731
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"losses.flatten\(1\).mean\(1\)"):
        tinyprop.train_step(model, x, y, token_loss, optimizer)


def test_user_hooks_run_as_in_pytorch():
    """A forward hook that scales a layer's output, a parameter hook that doubles a gradient
    and full backward hooks on a layer: plain PyTorch's gradients at ratio 1.0. Under
    tinypropv2 a hook on the output tensor also sees the skip decision's pass (documented in
    docs/models-and-loops.md); the layers' hooks run once."""
    plain = build("mlp")
    x, y = batch("mlp", size=8)
    calls = {}
    for name, config in (("plain", None), ("topk", KEEP_ALL), ("tinypropv2", None)):
        model = copy.deepcopy(plain)
        if name != "plain":
            model = tinyprop.apply(model, config or tinyprop.TinyPropConfig(policy=name))
        counts = calls[name] = {"layer": 0, "output": 0}
        model[0].register_forward_hook(lambda module, args, output: output * 1.5)
        model[2].weight.register_hook(lambda grad: 2 * grad)
        model[4].register_full_backward_hook(
            lambda module, grad_input, grad_output, counts=counts: counts.update(
                layer=counts["layer"] + 1
            )
        )
        output = model(x)
        output.register_hook(lambda grad, counts=counts: counts.update(output=counts["output"] + 1))
        if name == "plain":
            LOSS(output, y).mean().backward()
            expected = gradients(model)
        else:
            tinyprop.backward(model, LOSS(output, y))
            if name == "topk":
                assert_same(gradients(model), expected)
    assert calls["plain"] == calls["topk"] == {"layer": 1, "output": 1}
    assert calls["tinypropv2"] == {"layer": 1, "output": 2}


@pytest.mark.parametrize("policy", ["full", "topk", "tinyprop", "tinypropv2"])
@pytest.mark.parametrize("loop", ["train_step", "backward", "loss"])
def test_a_finished_step_lets_its_model_output_and_graph_go(policy, loop):
    """The model output (and through it the step's graph) is freed once the step is over: the
    forward pass it was recorded in used to keep it, and the graph held that pass back, a cycle
    the garbage collector cannot break (one output and graph kept per step, without end)."""
    import gc
    import weakref

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 7))
    tinyprop.apply(model, tinyprop.TinyPropConfig(policy=policy, ratio=0.5))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    outputs = []
    model.register_forward_hook(lambda module, args, output: outputs.append(weakref.ref(output)))
    for _ in range(4):
        x, y = torch.randn(16, 20), torch.randint(0, 7, (16,))
        if loop == "train_step":
            tinyprop.train_step(model, x, y, LOSS, optimizer)
        elif loop == "backward":
            tinyprop.backward(model, LOSS(model(x), y))
        else:
            tinyprop.loss(model, LOSS(model(x), y)).backward()
        optimizer.step()
        optimizer.zero_grad()
    gc.collect()
    alive = [ref for ref in outputs if ref() is not None]
    assert outputs and not alive, f"{len(alive)} of {len(outputs)} model outputs still alive"


@pytest.mark.parametrize("policy", ["topk", "tinyprop", "randomk", "full"])
@pytest.mark.parametrize("other_applied", [False, True])
@pytest.mark.parametrize("way", ["backward", "loss"])
def test_losses_of_another_model_are_refused(policy, other_applied, way):
    """tinyprop.backward(model_b, losses_of_model_a): the backward ran through A and B's step
    returned empty stats and an empty ledger, silently (tinypropv2 refused it already: its
    decision finds that the losses do not depend on B's output); under ``full`` B's step
    returned full stats and a full ledger for it. Also when B ran no forward pass since its
    last step; not when B's sparse layers are frozen on an input without a gradient (nothing
    of B to run)."""
    torch.manual_seed(0)
    config = tinyprop.TinyPropConfig(policy=policy, ratio=0.5)
    model_a, model_b = build("mlp"), tinyprop.apply(build("mlp"), config)
    if other_applied:
        tinyprop.apply(model_a, config)
    x, y = batch("mlp")

    def step(losses):
        if way == "backward":
            return tinyprop.backward(model_b, losses)
        tinyprop.loss(model_b, losses).backward()
        return tinyprop.step_stats(model_b)

    model_b(x)  # B ran, the losses are A's
    missed = "reache[sd] none of the (sparse layers|trainable parameters).*called 3 sparse"
    with pytest.raises(ValueError, match=missed):
        step(LOSS(model_a(x), y))
    with pytest.raises(ValueError, match="ran no forward pass with gradients"):
        step(LOSS(model_a(x), y))
    stats = step(LOSS(model_b(x), y))  # B's own losses train as before
    assert stats.keep or policy == "full"
    assert all(p.grad is not None for p in model_b.parameters())
    for parameter in model_b.parameters():
        parameter.requires_grad_(False)
    model_b(x)  # frozen B: its layer calls need no backward, A's losses go through
    assert step(LOSS(model_a(x), y)).keep == {}


def test_an_evaluation_forward_with_gradients_after_the_training_one_is_named():
    """An evaluation forward pass of 5 rows run with gradients between the training forward
    and tinyprop.backward: it asked for sample_dim=, which the shapes did not call for."""
    torch.manual_seed(0)
    model = tinyprop.apply(build("mlp"), tinyprop.TinyPropConfig(policy="tinypropv2"))
    x, y = batch("mlp", size=8)
    output = model(x)
    model(x[:5])  # evaluation, forgotten torch.no_grad()
    with pytest.raises(ValueError, match=r"8 losses.*shape \(5, .*2 forward passes.*no_grad"):
        tinyprop.backward(model, LOSS(output, y))
    output = model(x)
    assert tinyprop.backward(model, LOSS(output, y)).trained  # one pass: trains


def test_the_same_losses_twice_under_tinypropv2_name_the_used_forward_pass():
    """A second tinyprop.backward on the same losses (tinypropv2) asked for output=..., which
    would not help: the forward pass they come from belongs to the first step, whose
    backward ran through it."""
    torch.manual_seed(0)
    model = tinyprop.apply(build("mlp"), tinyprop.TinyPropConfig(policy="tinypropv2"))
    x, y = batch("mlp")
    losses = LOSS(model(x), y)
    tinyprop.backward(model, losses)
    with pytest.raises(ValueError, match="the same losses given to tinyprop twice"):
        tinyprop.backward(model, losses)
    assert tinyprop.backward(model, LOSS(model(x), y)).trained


def test_losses_of_two_forward_passes_ask_which_output_decides():
    """Losses from two forward passes since the last step (a consistency term on a second
    forward): tinypropv2 measured Y_L of the last output alone, whose gradient is the small
    consistency term's, and skipped every sample from the second step on (one forward: 6 of 6
    trained), silently. An evaluation forward run with
    gradients before the training forward is not part of the losses and changes nothing."""
    torch.manual_seed(0)
    model = tinyprop.apply(build("mlp"), tinyprop.TinyPropConfig(policy="tinypropv2"))
    x, y = batch("mlp")
    first = model(x)
    second = model(x + 0.01)
    losses = LOSS(first, y) + 1e-3 * (second - first.detach()).pow(2).sum(1)
    with pytest.raises(ValueError, match="come from 2 forward passes of the model"):
        tinyprop.backward(model, losses)
    first = model(x)
    losses = LOSS(first, y) + 1e-3 * (model(x + 0.01) - first.detach()).pow(2).sum(1)
    assert tinyprop.backward(model, losses, output=first).trained == len(y)
    model(x[:2])  # an evaluation with gradients
    assert tinyprop.backward(model, LOSS(model(x), y)).trained


@pytest.mark.parametrize("weights", ["clones", "leaves"])
def test_full_policy_takes_the_weights_functional_call_gives(weights):
    """The ``full`` policy's check for losses of another model walks their graph to the
    model's parameters; weights given by torch.func.functional_call (clones of them, or new
    leaves: fast weights) are the model's too, and get plain PyTorch's gradients."""
    torch.manual_seed(0)
    model = tinyprop.apply(build("mlp"), tinyprop.TinyPropConfig(policy="full"))
    x, y = batch("mlp")
    given = {name: p.detach().clone().requires_grad_() for name, p in model.named_parameters()}
    if weights == "clones":
        given = {name: p.clone() for name, p in model.named_parameters()}
    losses = LOSS(torch.func.functional_call(model, given, (x,)), y)
    expected = torch.autograd.grad(losses.mean(), list(given.values()), retain_graph=True)
    assert tinyprop.backward(model, losses).trained == len(y)
    leaves = list(given.values()) if weights == "leaves" else list(model.parameters())
    for leaf, want in zip(leaves, expected, strict=True):
        torch.testing.assert_close(leaf.grad, want, rtol=0, atol=0)


def test_a_detached_output_or_a_sample_dim_outside_it_is_named():
    """output= a detached tensor gave PyTorch's 'One of the differentiated Tensors does not
    require grad'; sample_dim=2 of a (B, C) output an IndexError ('tuple index out of
    range')."""
    torch.manual_seed(0)
    model = tinyprop.apply(build("mlp"), tinyprop.TinyPropConfig(policy="tinypropv2"))
    x, y = batch("mlp")
    output = model(x)
    with pytest.raises(ValueError, match="does not require grad: it is detached"):
        tinyprop.backward(model, LOSS(output, y), output=output.detach())
    output = model(x)
    with pytest.raises(ValueError, match="sample_dim=2 is not a dimension of the output"):
        tinyprop.backward(model, LOSS(output, y), sample_dim=2)
    output = model(x)
    assert tinyprop.backward(model, LOSS(output, y), output=output, sample_dim=-2).trained
    # output= neither a tensor nor a tuple of tensors: it asked for the output= it was given
    first = model(x)
    with pytest.raises(ValueError, match=r"output= must be .*tuple of tensors.*got a dict"):
        tinyprop.backward(model, LOSS(first, y), output={"logits": first})


@pytest.mark.parametrize("policy", ["full", "topk"])
def test_two_losses_of_one_forward_pass_each_with_its_own_backward(policy):
    """``tinyprop.backward(model, losses_a, retain_graph=True)`` then
    ``tinyprop.backward(model, losses_b)`` on one forward pass: plain PyTorch's gradient of
    the sum at ratio 1.0, and the forward counted once. Before, tinyprop.backward took no
    ``retain_graph`` (TypeError), and without it PyTorch asked for one."""
    plain = build("mlp")
    model = tinyprop.apply(copy.deepcopy(plain), tinyprop.TinyPropConfig(policy=policy, ratio=1.0))
    x, y = batch("mlp", size=8)
    output = plain(x)
    (LOSS(output, y).mean() + output.square().mean(1).mean()).backward()
    output = model(x)
    first = tinyprop.backward(model, LOSS(output, y), retain_graph=True)
    second = tinyprop.backward(model, output.square().mean(1))
    assert_same(gradients(model), gradients(plain))
    assert first.macs.forward > 0 and second.macs.forward == 0
    assert (second.trained, second.skipped) == (8, 0)
    if policy == "topk":  # k of every row and layer, all kept at 1.0 (its keep was empty)
        assert list(second.keep) == list(first.keep) == ["0", "2", "4"]
        for name, keep in first.keep.items():
            assert torch.equal(second.keep[name], keep) and keep.numel() == 8
        assert second.kernels.keys() == first.kernels.keys()


@pytest.mark.parametrize("way", ["backward", "loss"])
def test_a_second_skip_decision_on_one_forward_pass_is_refused(way):
    """Under tinypropv2 the second losses of a forward pass whose backward a step ran
    already would be decided alone, against Ymax_L of the first losses (here a small
    auxiliary loss skipped every sample, silently): a ValueError before any backward, saying
    to add the losses. Micro-batches' forward passes, each decided on its own, still run."""
    config = tinyprop.TinyPropConfig(policy="tinypropv2")
    model = tinyprop.apply(build("mlp"), config)
    x, y = batch("mlp", size=8)
    output = model(x)
    if way == "backward":
        tinyprop.backward(model, LOSS(output, y), retain_graph=True)
    else:
        tinyprop.loss(model, LOSS(output, y)).backward(retain_graph=True)
    once = gradients(model)
    for given in (None, output):
        with pytest.raises(ValueError, match=r"losses_a \+ losses_b"):
            tinyprop.backward(model, output.square().mean(1), output=given)
    assert_same(gradients(model), once, atol=0)
    outputs = [model(x[part]) for part in (slice(0, 4), slice(4, 8))]
    for output, part in zip(outputs, (slice(0, 4), slice(4, 8)), strict=True):
        stats = tinyprop.backward(model, LOSS(output, y[part]), output=output, scale=0.5)
        assert stats.trained + stats.skipped == 4
