"""A run saved mid-way (the model's and the optimizer's ``state_dict`` through ``torch.save``)
and resumed into freshly built, applied objects goes on as the uninterrupted run does, bit for
bit: the same samples trained, weights, running maxima, backward counts (random-k's draws),
score window and budget controller, every policy (float32, the native kernels)."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import tinyprop

LOSS = nn.CrossEntropyLoss(reduction="none")
STEPS, SAVED_AT = 8, 3
CONFIGS = {
    "topk": {"policy": "topk", "ratio": 0.1},
    "randomk": {"policy": "randomk", "ratio": 0.2},
    "tinyprop": {"policy": "tinyprop"},
    "tinypropv2": {"policy": "tinypropv2", "skip_threshold": 0.95},
    "tinypropv2-budget": {"policy": "tinypropv2", "budget": 0.3},
    "selective_backprop": {"policy": "selective_backprop"},
}


def fresh(config: dict) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5)
    )
    tinyprop.apply(model, tinyprop.TinyPropConfig(**config))
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def train(model, optimizer, steps: range) -> list[list[bool]]:
    """The trained mask of each step."""
    trained = []
    for step in steps:
        generator = torch.Generator().manual_seed(step)
        x = torch.randn(16, 20, generator=generator)  # (B, 20)
        y = x[:, :5].argmax(1)  # (B,) learnable: the errors fall, samples get skipped
        trained.append(tinyprop.train_step(model, x, y, LOSS, optimizer).trained_mask.tolist())
    return trained


def same(got: dict, expected: dict) -> list[str]:
    """Keys whose tensors differ (NaN equal to NaN: the score window's empty slots)."""
    return [
        key
        for key, value in expected.items()
        if not torch.equal(torch.nan_to_num(got[key], nan=-1.0), torch.nan_to_num(value, nan=-1.0))
    ]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_resumed_run_equals_the_uninterrupted_one_bit_for_bit(name):
    model, optimizer = fresh(CONFIGS[name])
    expected = train(model, optimizer, range(STEPS))
    first, first_optimizer = fresh(CONFIGS[name])
    trained = train(first, first_optimizer, range(SAVED_AT))
    saved = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": first_optimizer.state_dict()}, saved)
    saved.seek(0)
    checkpoint = torch.load(saved)
    resumed, resumed_optimizer = fresh(CONFIGS[name])
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    trained += train(resumed, resumed_optimizer, range(SAVED_AT, STEPS))
    assert trained == expected
    assert not same(resumed.state_dict(), model.state_dict())
    if CONFIGS[name]["policy"] in ("tinypropv2", "selective_backprop"):
        assert not all(map(all, expected))  # the run did skip samples
