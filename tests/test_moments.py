"""Adam with 8-bit moments (tinyprop.moments): the codes decode within half a step of the
block's scale, a non-zero v never decodes to 0, the first step is torch's Adam step, training
still converges close to float Adam, and bad settings are named."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tinyprop.moments import (
    BLOCK,
    Adam8bit,
    decode_first,
    decode_second,
    encode_first,
    encode_second,
)


def test_first_moment_codes_are_within_half_a_step_of_each_block_scale():
    m = torch.randn(3 * BLOCK + 5) * torch.logspace(-3, 1, 3 * BLOCK + 5)
    codes, largest = encode_first(m)
    assert codes.dtype == torch.int8 and largest.shape == (4,)
    decoded = decode_first(codes, largest)
    for block in range(4):
        part = slice(block * BLOCK, (block + 1) * BLOCK)
        step = float(largest[block]) / 127
        assert float((decoded[part] - m[part]).abs().max()) <= 0.5 * step * (1 + 1e-6)
        assert float(largest[block]) == float(m[part].abs().max())


def test_second_moment_never_decodes_a_non_zero_v_to_zero():
    v = torch.tensor([1e-12, 0.0, 4.0, 1e-20] + [1.0] * (BLOCK - 4))
    codes, largest = encode_second(v.sqrt())
    assert codes.dtype == torch.uint8
    decoded = decode_second(codes, largest)
    assert decoded[1] == 0 and bool((decoded[v > 0] > 0).all())
    assert float(decoded[2]) == pytest.approx(4.0, rel=1e-6)
    zero_codes, zero_largest = encode_second(torch.zeros(10))
    assert not zero_codes.any() and not zero_largest.any()


def test_first_step_is_torch_adam_step():
    """The first step runs on float moments that were zero: the same floats as torch's Adam."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
    other = copy.deepcopy(net)
    x, y = torch.randn(16, 20), torch.randint(0, 5, (16,))
    for model, optimizer in (
        (net, torch.optim.Adam(net.parameters(), lr=0.01, weight_decay=1e-3)),
        (other, Adam8bit(other.parameters(), lr=0.01, weight_decay=1e-3)),
    ):
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    for a, b in zip(net.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b)


def test_training_stays_close_to_float_adam():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
    other = copy.deepcopy(net)
    x, y = torch.randn(256, 20), torch.randint(0, 5, (256,))
    pairs = ((net, torch.optim.Adam(net.parameters(), lr=1e-2)),
             (other, Adam8bit(other.parameters(), lr=1e-2)))  # fmt: skip
    with torch.no_grad():
        start = float(nn.functional.cross_entropy(net(x), y))
    for _ in range(100):
        for model, optimizer in pairs:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    with torch.no_grad():
        losses = [float(nn.functional.cross_entropy(model(x), y)) for model, _ in pairs]
    assert losses[1] < 0.2 * start
    assert losses[1] == pytest.approx(losses[0], rel=0.6)


def test_bad_settings_are_named():
    parameters = nn.Linear(2, 2).parameters()
    with pytest.raises(ValueError, match="lr must be positive"):
        Adam8bit(parameters, lr=0)
    with pytest.raises(ValueError, match="betas"):
        Adam8bit(nn.Linear(2, 2).parameters(), betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="weight_decay"):
        Adam8bit(nn.Linear(2, 2).parameters(), weight_decay=-1)
    half = nn.Linear(2, 2).half()
    optimizer = Adam8bit(half.parameters())
    half(torch.ones(1, 2, dtype=torch.float16)).sum().backward()
    with pytest.raises(ValueError, match="float32"):
        optimizer.step()


def test_a_diverged_run_encodes_nan_as_code_zero():
    """NaN moments (a diverged run) get code 0 and do not set the block's scale, as in C."""
    m = torch.tensor([float("nan"), 2.0, -1.0, float("inf")] + [0.5] * (BLOCK - 4))
    codes, largest = encode_first(m[:3])
    assert codes.tolist() == [0, 127, -64] and float(largest[0]) == 2.0
    codes, largest = encode_first(m)  # an infinite scale: every code 0 (inf / inf is NaN)
    assert not codes.any() and float(largest[0]) == float("inf")
    w_codes, w_largest = encode_second(torch.tensor([float("nan"), 4.0, 1.0]))
    assert w_codes.tolist() == [0, 255, 64] and float(w_largest[0]) == 4.0
