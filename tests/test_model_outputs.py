"""train_step on models that return more than their logits: a tuple or list (logits,
features), a namedtuple, a dataclass, a dict, a transformers model under
``return_dict=False``. The skip decision measures the tensor the losses come from, found in
the losses' autograd graph (or the ``logits`` field): the same samples and weights as the model
returning its logits alone. Losses that depend on two of the tensors are refused, naming the
ways out (train_step takes no ``output=``)."""

from __future__ import annotations

import collections
import copy
import dataclasses

import pytest
import torch
from model_zoo import tiny_bert
from torch import nn

import tinyprop

LOSS = nn.CrossEntropyLoss(reduction="none")
Named = collections.namedtuple("Named", "features logits")


@dataclasses.dataclass
class Output:
    features: torch.Tensor
    scores: torch.Tensor


class Returns(nn.Module):
    """A two-layer classifier returning its logits in the form ``returns`` names."""

    def __init__(self, returns: str):
        super().__init__()
        self.returns = returns
        self.body, self.head, self.other = nn.Linear(12, 16), nn.Linear(16, 5), nn.Linear(16, 5)

    def forward(self, x):
        features = torch.relu(self.body(x))  # (B, 16)
        logits = self.head(features)  # (B, 5)
        return {
            "alone": logits,
            "tuple": (logits, features),
            "list": [features, logits],
            "namedtuple": Named(features, logits),
            "dataclass": Output(features, logits),
            "dict": {"hidden": features, "out": logits},
            "two heads": (logits, self.other(features)),
        }[self.returns]


def logits_of(output):
    if isinstance(output, Output):
        return output.scores
    if isinstance(output, dict):
        return output["out"]
    if isinstance(output, Named):
        return output.logits
    return output[0] if isinstance(output, tuple) else output[1]


def per_sample_loss(output, y):
    return LOSS(logits_of(output) if not isinstance(output, torch.Tensor) else output, y)


def data(step: int):
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(32, 12, generator=generator, dtype=torch.float64)
    return x, x[:, :5].argmax(1)  # a learnable task: easy samples are skipped


@pytest.mark.parametrize("returns", ["tuple", "list", "namedtuple", "dataclass", "dict"])
def test_train_step_measures_the_output_the_losses_come_from(returns):
    """Before, train_step refused each of these outputs ("the model must return one output
    tensor"): tinypropv2's skip decisions and the weights after eight steps equal the model
    returning its logits alone, bit for bit."""
    torch.manual_seed(0)
    config = tinyprop.TinyPropConfig(policy="tinypropv2", skip_threshold=0.8)
    alone = tinyprop.apply(Returns("alone").double(), config)
    model = copy.deepcopy(alone)
    model.returns = returns
    optimizers = [torch.optim.SGD(m.parameters(), lr=1.0) for m in (alone, model)]
    skipped = 0
    for step in range(8):
        x, y = data(step)
        expected = tinyprop.train_step(alone, x, y, per_sample_loss, optimizers[0])
        stats = tinyprop.train_step(model, x, y, per_sample_loss, optimizers[1])
        assert torch.equal(stats.trained_mask, expected.trained_mask)
        skipped += stats.skipped
    assert skipped > 0  # the decision was made, and skipped samples
    wanted = alone.state_dict()
    for name, got in model.state_dict().items():
        assert torch.equal(got, wanted[name]), name


def test_train_step_refuses_losses_of_two_output_tensors_naming_the_ways_out():
    """Two heads whose losses are summed: which one the skip decision measures is not known
    (a term on the features the logits come from is not this case: the logits are measured).
    Refused before the step (no gradient, no update)."""
    torch.manual_seed(0)
    model = tinyprop.apply(Returns("two heads").double(), tinyprop.TinyPropConfig())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    before = copy.deepcopy(model.state_dict())

    def both_heads(output, y):
        return LOSS(output[0], y) + LOSS(output[1], y)

    x, y = data(0)
    with pytest.raises(ValueError, match=r"train_step: .*takes no output=.*'logits'.*own loop"):
        tinyprop.train_step(model, x, y, both_heads, optimizer)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_transformers_model_with_return_dict_false_trains_as_with_a_model_output():
    """``return_dict=False, output_hidden_states=True``: the model returns (logits,
    hidden_states), a tuple of a tensor and a tuple of tensors. topk 0.5: the same kept
    entries and weights as the ModelOutput run."""
    plain = tiny_bert()
    settings = tinyprop.TinyPropConfig(policy="topk", ratio=0.5)
    dictionary = tinyprop.apply(copy.deepcopy(plain), settings)
    tupled = tinyprop.apply(copy.deepcopy(plain), settings)
    ids = torch.randint(3, 40, (4, 7), generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 1])
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (dictionary, tupled)]
    for _ in range(2):
        expected = tinyprop.train_step(
            dictionary, {"input_ids": ids}, y, lambda out, y: LOSS(out.logits, y), optimizers[0]
        )
        stats = tinyprop.train_step(
            tupled,
            {"input_ids": ids, "return_dict": False, "output_hidden_states": True},
            y,
            lambda out, y: LOSS(out[0], y),
            optimizers[1],
        )
        assert expected.keep.keys() == stats.keep.keys()
        for name, kept in expected.keep.items():
            assert torch.equal(stats.keep[name], kept), name
    for (name, got), want in zip(tupled.named_parameters(), dictionary.parameters(), strict=True):
        assert torch.equal(got, want), name
