"""The ``full`` policy is plain PyTorch: every model of the zoo, in float32, trains to the
bit-identical weights and evaluates to the bit-identical output (Adam, which turns a rounding
difference in a gradient into a step difference of the learning rate's size)."""

from __future__ import annotations

import copy

import pytest
import torch
from model_zoo import zoo

import tinyprop

STEPS = 4


def train(model, inputs, y, loss_fn, applied: bool, autocast: bool = False):
    """Adam for a few steps on one batch, the forward under CPU bfloat16 autocast if asked;
    returns the parameters and the evaluation output (under torch.no_grad, in eval mode)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(STEPS):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            output = model(*inputs)
        losses = loss_fn(output, y)
        if applied:
            tinyprop.backward(model, losses)
        else:
            losses.mean().backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        output = model(*inputs)
    output = output["logits"] if isinstance(output, dict) else output
    return {name: p.detach().clone() for name, p in model.named_parameters()}, output


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "autocast-bfloat16"])
@pytest.mark.parametrize("name", list(zoo()))
def test_full_policy_trains_and_evaluates_as_plain_pytorch_to_the_bit(name, autocast):
    """nn.MultiheadAttention (alone or in a TransformerEncoderLayer) ran tinyprop's rewritten
    attention under ``full`` too: its rounding differs from PyTorch's, and after 5 Adam steps
    a TransformerEncoder's weights were 1e-2 apart in float32. Under bfloat16 autocast (the
    transformers Trainer's ``bf16=True``, Lightning's ``"bf16-mixed"``) ``full`` keeps
    PyTorch's bfloat16 backward; the sparse policies compute theirs in float32."""
    model, inputs, y, loss_fn = zoo(size=4, seed=0)[name]()
    model = model.float()
    inputs = tuple(t.float() if t.is_floating_point() else t for t in inputs)
    applied = tinyprop.apply(copy.deepcopy(model), tinyprop.TinyPropConfig(policy="full"))
    expected, expected_output = train(model, inputs, y, loss_fn, False, autocast)
    got, output = train(applied, inputs, y, loss_fn, True, autocast)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    assert torch.equal(output, expected_output)
