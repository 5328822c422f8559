"""tinyprop.reset_error_maxima: TinyProp's running maxima (Ymax_l, Ymax_L) start afresh, e.g.
before fine-tuning on another dataset, and the next step is that of the model applied anew."""

import copy

import pytest
import torch
from core_models import batch, build
from torch import nn

import tinyprop

LOSS = nn.CrossEntropyLoss(reduction="none")


def one_step(model, x, y):
    """One SGD step; its stats and the weights after it."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stats = tinyprop.train_step(model, x, y, LOSS, optimizer)
    return stats, {name: p.detach().clone() for name, p in model.named_parameters()}


def maxima(model) -> dict:
    return {n: b.clone() for n, b in model.named_buffers() if n.endswith("error_max")}


@pytest.mark.parametrize("policy", ["tinyprop", "tinypropv2"])
def test_a_reset_model_steps_as_the_same_weights_applied_anew(policy):
    """Trained on large errors (old data), then reset: the step on the new data keeps and
    skips what the same weights applied afresh do. Without the reset the old maxima hold k
    near S_min and skip more samples (checked, so the comparison can fail)."""
    config = tinyprop.TinyPropConfig(policy=policy)
    model = tinyprop.apply(build("mlp"), config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the maxima move, the weights not
    for step in range(3):
        x, y = batch("mlp", size=8, seed=step)
        tinyprop.train_step(model, 20 * x, y, LOSS, optimizer)  # large errors
    raised = maxima(model)
    assert all(value > 0 for name, value in raised.items() if name.endswith(".error_max"))
    x, y = batch("mlp", size=8, seed=10)  # the new data
    kept = copy.deepcopy(model)
    fresh = tinyprop.apply(tinyprop.remove(copy.deepcopy(model)), config)
    assert tinyprop.reset_error_maxima(model) is model
    assert all(float(value) == 0 for value in maxima(model).values())
    assert maxima(model).keys() == raised.keys()
    got, got_weights = one_step(model, x, y)
    expected, expected_weights = one_step(fresh, x, y)
    stale, stale_weights = one_step(kept, x, y)
    assert torch.equal(got.trained_mask, expected.trained_mask)
    assert got.keep.keys() == expected.keep.keys()
    for name, keep in expected.keep.items():
        assert torch.equal(got.keep[name], keep), name
    for name, weight in expected_weights.items():
        assert torch.equal(got_weights[name], weight), name
    assert got.macs == expected.macs
    for name, value in maxima(fresh).items():
        assert torch.equal(maxima(model)[name], value), name
    differs = not torch.equal(stale.trained_mask, expected.trained_mask) or any(
        not torch.equal(stale.keep.get(name, torch.empty(0)), keep)
        for name, keep in expected.keep.items()
    )
    assert differs  # the old maxima change the step: the reset is what made it equal


def test_reset_error_maxima_under_ddp_wrapper_and_unapplied_model():
    """A DataParallel-style wrapper is unwrapped; a model without tinyprop is a ValueError."""
    model = tinyprop.apply(build("mlp"), tinyprop.TinyPropConfig(policy="tinypropv2"))
    x, y = batch("mlp", size=8)
    tinyprop.train_step(model, x, y, LOSS, torch.optim.SGD(model.parameters(), lr=0.1))
    wrapper = nn.DataParallel(model)
    tinyprop.reset_error_maxima(wrapper)
    assert all(float(value) == 0 for value in maxima(model).values())
    with pytest.raises(ValueError, match="tinyprop.apply"):
        tinyprop.reset_error_maxima(build("mlp"))
