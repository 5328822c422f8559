"""unified=True: meProp's unified top-k, one set of kept output channels per layer call."""

import pytest
import torch
from torch import nn

import tinyprop

LOSS = nn.CrossEntropyLoss(reduction="none")


def delta_and_gradients(layer: nn.Module, x, y, channels_kept: int):
    """The output gradient δ of a single-layer model under the batch-mean loss, and the
    gradients from its ``channels_kept`` channels of largest Σ |δ| (ties to the lower index)."""
    plain = nn.Sequential(layer)
    output = plain(x)
    output.retain_grad()
    LOSS(output.flatten(1), y).mean().backward()
    delta = output.grad  # (B, C_out, ...)
    score = delta.abs().sum([d for d in range(delta.dim()) if d != 1])  # (C_out,)
    order = sorted(range(score.numel()), key=lambda c: (-float(score[c]), c))
    kept = torch.zeros_like(score, dtype=torch.bool)
    kept[order[:channels_kept]] = True
    masked = delta * kept.view(1, -1, *([1] * (delta.dim() - 2)))
    x_ = x.detach().requires_grad_(True)
    weight = layer.weight.detach().clone().requires_grad_(True)
    if isinstance(layer, nn.Linear):
        out = nn.functional.linear(x_, weight)
    else:
        out = nn.functional.conv2d(x_, weight, None, layer.stride, layer.padding, 1, layer.groups)
    out.backward(masked)
    return kept.nonzero().flatten(), weight.grad, x_.grad


@pytest.mark.parametrize("groups", [1, 2, 4])  # 4: one input channel per group, as depthwise
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_unified_keeps_the_same_channels_for_every_row_and_their_exact_gradients(kind, groups):
    torch.manual_seed(0)
    if kind == "linear":
        if groups > 1:
            pytest.skip("a Linear layer has no groups")
        layer, x = nn.Linear(7, 20), torch.randn(6, 7)
        ratio, positions = 0.2, 1  # k = 4 of 20 outputs
    else:
        layer, x = nn.Conv2d(4, 8, 3, padding=1, groups=groups), torch.randn(6, 4, 3, 3)
        ratio, positions = 0.3, 9  # k = round(0.3 · 72) = 22 -> ⌈22 / 9⌉ = 3 channels
    y = torch.randint(0, 20 if kind == "linear" else 72, (6,))
    reference = nn.Sequential(layer)
    model = tinyprop.apply(
        nn.Sequential(type(layer)(**_args(layer))),
        tinyprop.TinyPropConfig(policy="topk", ratio=ratio, unified=True),
    )
    with torch.no_grad():
        model[0].weight.copy_(reference[0].weight)
        model[0].bias.copy_(reference[0].bias)
    inputs = x.clone().requires_grad_(True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    stats = tinyprop.train_step(model, inputs, y, lambda o, t: LOSS(o.flatten(1), t), optimizer)
    expected_k = 4 if kind == "linear" else 3
    channels, grad_weight, grad_input = delta_and_gradients(reference[0], x, y, expected_k)
    assert stats.keep["0"].tolist() == [expected_k * positions] * 6  # the same k for every row
    kept_rows = model[0].weight.grad.flatten(1).abs().sum(1).nonzero().flatten()
    assert set(kept_rows.tolist()) <= set(channels.tolist())
    torch.testing.assert_close(model[0].weight.grad, grad_weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(inputs.grad, grad_input, rtol=1e-5, atol=1e-6)


def _args(layer):
    if isinstance(layer, nn.Linear):
        return {"in_features": layer.in_features, "out_features": layer.out_features}
    return {
        "in_channels": layer.in_channels, "out_channels": layer.out_channels,
        "kernel_size": layer.kernel_size, "padding": layer.padding, "groups": layer.groups,
    }  # fmt: skip


@pytest.mark.parametrize("policy", ["tinyprop", "tinypropv2"])
def test_unified_adaptive_policies_train_and_count_the_shared_k(policy):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5)
    )
    config = tinyprop.TinyPropConfig(policy=policy, unified=True, skip_threshold=0.0)
    tinyprop.apply(model, config)
    x, y = torch.randn(8, 12), torch.randint(0, 5, (8,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        stats = tinyprop.train_step(model, x, y, LOSS, optimizer)
    for name, keep in stats.keep.items():
        assert (keep == keep[0]).all(), name  # one k (one index set) per layer call
    assert 0 < stats.macs.backward_ratio() < 1


def test_unified_is_refused_where_it_has_no_meaning():
    for policy in ("full", "randomk"):
        with pytest.raises(ValueError, match="unified applies to"):
            tinyprop.TinyPropConfig(policy=policy, unified=True)
    with pytest.raises(TypeError, match="unified"):
        tinyprop.TinyPropConfig(policy="topk", unified="yes")
