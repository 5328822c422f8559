"""The ledger's MAC counts against counts done by hand (see the comments)."""

import dataclasses
import warnings

import pytest
import torch
from core_models import batch, build
from torch import nn

import tinyprop

LOSS = nn.CrossEntropyLoss(reduction="none")


def one_step(name, config, size):
    model = tinyprop.apply(build(name), config)
    x, y = batch(name, size=size)
    return tinyprop.train_step(model, x, y, LOSS, torch.optim.SGD(model.parameters(), lr=0.1))


# MLP 12-16-16-5, per sample:
#   forward 12·16 + 16·16 + 16·5 = 528
#   dense backward: L0 weight 192 + bias 16 = 208 (no input gradient for the first layer);
#   L1 weight 256 + input 256 + activation 16 + bias 16 = 544; L2 80 + 80 + 16 + 5 = 181 -> 933
#   topk 0.25: k = 4, 4, 1 -> L0 4·12 + 16 = 64; L1 4·16·2 + 16 + 16 = 160; L2 16·2 + 16 + 5 = 53
#   -> 277, selection 16 + 16 + 5 = 37
# CNN (3x8x8), per sample: conv0 N=384 fan_in=27, dw conv1 N=96 fan_in=9 (no bias),
#   conv2 N=64 fan_in=54, linear N=5 fan_in=16
#   forward 10368 + 864 + 3456 + 80 = 14768
#   dense: 10368+384 | 864+864+384 | 3456+3456+96+64 | 80+80+16+5 = 10752+2112+7072+181 = 20117
#   topk 0.1: k = 38, 10, 6, 1 -> 1026+384 | 90+90+384 | 324+324+96+64 | 16+16+16+5
#   = 1410 + 564 + 808 + 53 = 2835, selection 384 + 96 + 64 + 5 = 549
CASES = {
    ("mlp", "full"): dict(forward=528, backward=933, backward_dense=933, selection=0),
    ("mlp", "topk"): dict(forward=528, backward=277, backward_dense=933, selection=37),
    ("cnn", "full"): dict(forward=14768, backward=20117, backward_dense=20117, selection=0),
    ("cnn", "topk"): dict(forward=14768, backward=2835, backward_dense=20117, selection=549),
}
RATIOS = {"mlp": 0.25, "cnn": 0.1}


@pytest.mark.parametrize("name,policy", list(CASES))
def test_ledger_matches_hand_count(name, policy):
    size = 3
    stats = one_step(name, tinyprop.TinyPropConfig(policy=policy, ratio=RATIOS[name]), size)
    expected = {key: value * size for key, value in CASES[(name, policy)].items()}
    assert {k: getattr(stats.macs, k) for k in expected} == expected


def test_ledger_ratios_and_accumulation():
    ledger = tinyprop.Ledger()
    for _ in range(2):
        ledger += one_step("mlp", tinyprop.TinyPropConfig(policy="topk", ratio=0.25), 3).macs
    assert ledger.forward == 2 * 3 * 528
    assert ledger.backward_ratio() == pytest.approx((277 + 37) / 933)
    assert ledger.ratio() == pytest.approx((528 + 277 + 37) / (528 + 933))
    assert ledger.as_dict()["backward_ratio"] == ledger.backward_ratio()


def test_tinyprop_ledger_follows_kept_counts():
    stats = one_step("mlp", tinyprop.TinyPropConfig(policy="tinyprop"), 4)
    k = {name: stats.keep[name].sum().item() for name in ("0", "2", "4")}
    # per trained sample fixed parts: L0 bias 16; L1 activation 16 + bias 16; L2 16 + 5
    expected = k["0"] * 12 + 4 * 16 + k["2"] * 32 + 4 * 32 + k["4"] * 32 + 4 * 21
    assert stats.macs.backward == expected
    assert stats.macs.selection == 4 * 2 * (16 + 16 + 5)


def test_skipped_samples_cost_forward_and_decision_only():
    model = tinyprop.apply(build("mlp"), tinyprop.TinyPropConfig(skip_threshold=1.0))
    model.tinyprop_output_error_max.fill_(1e6)  # every D = Y_L / Ymax_L < τ: all skipped
    x, y = batch("mlp", size=4)
    stats = tinyprop.train_step(model, x, y, LOSS, torch.optim.SGD(model.parameters(), lr=0.1))
    assert stats.skipped == 4
    assert stats.macs.forward == 4 * 528 and stats.macs.backward == 0
    assert stats.macs.backward_dense == 4 * 933
    assert stats.macs.selection == 4 * 5  # Y_L of the 5 outputs, per sample


def test_dense_output_layer_costs_dense_backward_and_no_selection():
    config = tinyprop.TinyPropConfig(policy="topk", ratio=0.25, dense_output_layer=True)
    stats = one_step("mlp", config, 3)
    # L0 64 and L1 160 as in the topk case; L2 dense: 80 + 80 + 16 + 5 = 181
    assert stats.macs.backward == 3 * (64 + 160 + 181)
    assert stats.macs.selection == 3 * (16 + 16)


class CustomLinear(nn.Module):
    """A linear layer tinyprop does not know (no nn.Linear subclass): it stays dense."""

    def __init__(self, inputs: int, outputs: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(outputs, inputs) / inputs**0.5)

    def forward(self, x):
        return x @ self.weight.t()


def test_ledger_counts_custom_dense_modules_as_dense():
    """Two custom linear modules (dense) and one nn.Linear head (top-k), batch 8."""
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="0 \\(CustomLinear\\), 2 \\(CustomLinear\\)"):
        model = tinyprop.apply(
            nn.Sequential(CustomLinear(64, 128), nn.ReLU(), CustomLinear(128, 128), nn.ReLU(),
                          nn.Linear(128, 10)),
            tinyprop.TinyPropConfig(policy="topk", ratio=0.1),
        )  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 64), torch.randint(0, 10, (8,))
    stats = tinyprop.train_step(model, x, y, LOSS, optimizer)
    other = 8 * (64 * 128 + 128 * 128)  # the custom modules' forward: 196,608 MACs
    head_dense = 10 * 128 + 10 * 128 + 128 + 10  # weight + input grad + ReLU' + bias, per row
    head_sparse = 1 * 128 + 1 * 128 + 128 + 10  # k = 1 of 10 outputs
    assert stats.macs.forward == other + 8 * 128 * 10  # 206,848, not only the head's 10,240
    assert stats.macs.backward_dense == 2 * other + 8 * head_dense
    assert stats.macs.backward == 2 * other + 8 * head_sparse
    assert stats.macs.selection == 8 * 10
    assert stats.macs.unattributed == 3 * other
    assert stats.macs.backward_ratio() == pytest.approx(
        (2 * other + 8 * head_sparse + 80) / (2 * other + 8 * head_dense)
    )
    assert stats.macs.backward_ratio() > 0.95  # the saving on the head is almost nothing


@pytest.mark.parametrize("policy", ["full", "topk"])
def test_frozen_first_layer_has_no_backward_in_the_ledger(policy):
    """A frozen first layer (weight and bias without grad, input without grad) does no backward:
    it is counted in the forward only, never as a dense module."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5))
    model[0].requires_grad_(False)
    tinyprop.apply(model, tinyprop.TinyPropConfig(policy=policy, ratio=1.0))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    stats = tinyprop.train_step(
        model, torch.randn(4, 12), torch.tensor([0, 1, 2, 3]), LOSS, optimizer
    )
    head = 5 * 16 + 5  # weight + bias gradient per sample: nothing below needs an input grad
    assert stats.macs.forward == 4 * (12 * 16 + 16 * 5)
    assert stats.macs.backward_dense == 4 * head
    assert stats.macs.backward == 4 * head
    assert stats.macs.unattributed == 0


@pytest.mark.parametrize("policy", ["full", "topk", "tinypropv2"])
def test_bias_only_first_layer_counts_its_dense_bias_gradient(policy):
    """A first layer whose bias alone trains runs no sparse backward (its input and weight need
    no gradient), but its bias gradient is formed: 16 additions per trained sample, under every
    policy (the sparse ones left it out; the C runtime counts it)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5))
    model[0].weight.requires_grad_(False)
    tinyprop.apply(model, tinyprop.TinyPropConfig(policy=policy, ratio=1.0, skip_threshold=0.0))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    stats = tinyprop.train_step(
        model, torch.randn(4, 12), torch.tensor([0, 1, 2, 3]), LOSS, optimizer
    )
    # the head per trained sample: weight 16 k + input 16 k + ReLU 16 + bias 5 (k = 5 under
    # full and topk 1.0, tinypropv2's k as recorded); the first layer's bias 16
    keep = stats.keep["2"].tolist() if policy == "tinypropv2" else [5] * 4
    assert stats.trained == len(keep) == 4
    assert stats.macs.backward_dense == 4 * (80 + 80 + 16 + 5 + 16)
    assert stats.macs.backward == sum(2 * 16 * k + 16 + 5 + 16 for k in keep)


class Flagged(nn.Module):
    """A flag argument runs a dense (not sparse) product of 16 x 16 per sample more."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(16, 16)
        self.mix = nn.Parameter(torch.eye(16))
        self.head = nn.Linear(16, 3)

    def forward(self, x, extra: bool = False):
        h = torch.relu(self.hidden(x))
        return self.head(h @ self.mix if extra else h)


@pytest.mark.parametrize("mode", ["flag", "training"])
def test_other_macs_follow_a_flag_argument_and_the_training_mode(mode):
    """The MACs of the modules that stay dense were measured once per input shape: a call with
    another flag (or in another mode) was counted with the first call's MACs."""
    model = tinyprop.apply(Flagged(), tinyprop.TinyPropConfig(policy="topk", ratio=0.5))
    x, y = torch.randn(4, 16), torch.randint(0, 3, (4,))
    ledgers = []
    for extra in (False, True, False):
        if mode == "flag":
            output = model(x, extra=extra)
        else:  # the module computes the extra product in eval mode
            model.train(not extra)
            output = model(x, extra=not model.training)
        ledgers.append(tinyprop.backward(model, LOSS(output, y)).macs.unattributed)
    assert ledgers[1] - ledgers[0] == 3 * 4 * 16 * 16  # forward + twice it backward, B = 4
    assert ledgers[2] == ledgers[0]


class UnusedHead(nn.Module):
    """The MLP of CASES and an auxiliary head called last whose output the loss leaves out."""

    def __init__(self):
        super().__init__()
        self.mlp = build("mlp")
        self.aux = nn.Linear(16, 3).to(self.mlp[0].weight.dtype)

    def forward(self, x):
        features = self.mlp[:-1](x)
        return self.mlp[-1](features), self.aux(features)


@pytest.mark.parametrize("way", ["unused head", "backward(inputs=...)"])
def test_a_layer_the_backward_never_reached_is_not_in_the_dense_backward(way):
    """Plain PyTorch does not backpropagate a head whose output no loss uses, nor layers that
    ``backward(inputs=...)`` leaves out; the dense backward the step is measured against counted
    them (the unused head: 115 MACs per sample more, a saving nobody made). Hand counts of
    CASES: the head adds its forward only."""
    size = 3
    model = tinyprop.apply(UnusedHead(), tinyprop.TinyPropConfig(policy="topk", ratio=0.25))
    x, y = batch("mlp", size=size)
    logits, _ = model(x)
    losses = LOSS(logits, y)
    if way == "unused head":
        stats = tinyprop.backward(model, losses)
        expected = CASES[("mlp", "topk")]
    else:  # the last layer alone, as CASES counts it (its input gradient is formed too)
        head = list(model.mlp[-1].parameters())
        tinyprop.loss(model, losses).backward(inputs=head)
        stats = tinyprop.step_stats(model)
        expected = dict(forward=528, backward=53, backward_dense=181, selection=5)
    expected = {key: value * size for key, value in expected.items()}
    expected["forward"] += size * 16 * 3  # the head's forward ran
    assert {k: getattr(stats.macs, k) for k in expected} == expected
    assert set(stats.keep) == ({"mlp.0", "mlp.2", "mlp.4"} if way == "unused head" else {"mlp.4"})


class Unrolled(nn.Module):
    """A dense GRU cell (8 -> 16) unrolled ``steps`` times, a count given as an int."""

    def __init__(self):
        super().__init__()
        self.cell = nn.GRUCell(8, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x, steps: int):
        h = torch.zeros(x.shape[0], 16)
        for _ in range(steps):
            h = self.cell(x, h)
        return self.head(h)


def test_other_macs_follow_an_int_argument_such_as_an_unrolling_count():
    """Numbers counted by their type: model(x, steps=5) after model(x, steps=1) was counted
    with one step of the dense cell (the first call's MACs), a fifth of its work."""
    model = tinyprop.apply(Unrolled(), tinyprop.TinyPropConfig(policy="topk", ratio=0.5))
    x, y = torch.randn(4, 8), torch.randint(0, 3, (4,))
    cell_macs = 4 * 3 * 16 * (8 + 16)  # B x the three gates' input and hidden products
    for steps in (1, 5, 1):
        stats = tinyprop.backward(model, LOSS(model(x, steps=steps), y))
        assert stats.macs.forward == steps * cell_macs + 4 * 16 * 3
        assert stats.macs.unattributed == 3 * steps * cell_macs  # forward + twice it backward


def test_a_signature_that_changes_at_every_call_is_warned_once(monkeypatch):
    """An int that changes at every call (a step index) runs the FLOP counter at every
    forward, each a new signature: once the remembered signatures are full, one warning says
    so and what to do; the ledger stays right (each call measured)."""
    monkeypatch.setattr(tinyprop.model, "_MAX_SIGNATURES", 3)
    model = tinyprop.apply(Unrolled(), tinyprop.TinyPropConfig(policy="topk", ratio=0.5))
    x, y = torch.randn(4, 8), torch.randint(0, 3, (4,))
    cell_macs = 4 * 3 * 16 * (8 + 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(8):
            steps = 1 + step % 5
            stats = tinyprop.backward(model, LOSS(model(x, steps=steps), y))
            assert stats.macs.forward == steps * cell_macs + 4 * 16 * 3
    churn = [w for w in caught if "different call signatures" in str(w.message)]
    assert len(churn) == 1 and "as a tensor" in str(churn[0].message)


def loop_ledgers(policy: str, way: str) -> list:
    """The steps' ledgers of two backward passes over the forward passes of one batch of 8:
    two losses of one forward pass (retain_graph=True), or the forward passes of two
    micro-batches first, then one backward each. A dense custom module beside the sparse
    layers: its MACs are counted as other modules' (unattributed)."""
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="CustomLinear"):
        model = tinyprop.apply(
            nn.Sequential(nn.Linear(6, 16), nn.ReLU(), CustomLinear(16, 16), nn.ReLU(),
                          nn.Linear(16, 3)),
            tinyprop.TinyPropConfig(policy=policy, ratio=1.0),
        )  # fmt: skip
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    if way == "two losses":
        output = model(x)
        first = tinyprop.backward(model, LOSS(output, y), retain_graph=True)
        return [first.macs, tinyprop.backward(model, output.square().mean(1)).macs]
    halves = (slice(0, 4), slice(4, 8))
    outputs = [model(x[half]) for half in halves]
    return [
        tinyprop.backward(model, LOSS(output, y[half]), scale=0.5).macs
        for output, half in zip(outputs, halves, strict=True)
    ]


@pytest.mark.parametrize("way", ["two losses", "micro-batches"])
def test_each_step_counts_the_backward_it_ran_under_full_as_under_topk(way):
    """Each step's ledger holds the forward passes it took and the backward it ran, under
    ``full`` as under ``topk`` at 1.0 (the same work, selection aside), the custom module's
    dense backward included. Before, under ``full`` the first step counted the backward of
    every forward pass and the second none: a second loss's backward, which PyTorch ran, was
    in neither (the ratio of two loops' ledgers was off by it), and ``topk`` left the custom
    module's backward of the second step out."""
    full, topk = loop_ledgers("full", way), loop_ledgers("topk", way)
    other = 8 * 16 * 16 if way == "two losses" else 4 * 16 * 16  # the custom module, per pass
    for full_step, topk_step in zip(full, topk, strict=True):
        assert full_step.backward == full_step.backward_dense > 0
        assert topk_step.selection > 0
        assert full_step == dataclasses.replace(topk_step, selection=0)
        assert full_step.backward_dense >= 2 * other
    assert (
        full[1].forward == 0 and full[0].unattributed == (3 if way == "two losses" else 4) * other
    )
    assert full[1].unattributed == 2 * other  # the second step's backward of the custom module
    if way == "two losses":  # one forward pass, two backward passes through all of it
        assert full[1].backward == full[0].backward
    else:  # two halves of one batch: the same work each
        assert full[0].backward == full[1].backward
