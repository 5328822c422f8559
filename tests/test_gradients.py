"""Gradients of the sparse layers against plain PyTorch (float64), as micrograd's tests do."""

import copy

import pytest
import torch
from core_models import BUILDERS, batch, build
from torch import nn

import tinyprop
import tinyprop.autograd
import tinyprop.native
from tinyprop.functional import keep_count

LOSS = nn.CrossEntropyLoss(reduction="none")


@pytest.fixture(params=["sparse kernels", "dense kernels", "pytorch-only kernels"])
def kernel(request, monkeypatch):
    """Run a test with the sparse kernels only, then with the dense kernels only, then with
    the sparse kernels and no native (compiled) selection."""
    threshold = 0.0 if request.param == "dense kernels" else float("inf")
    monkeypatch.setattr(tinyprop.autograd, "NATIVE_DENSE_KERNEL_DENSITY", threshold)
    monkeypatch.setattr(tinyprop.autograd, "NATIVE_CONV_DENSE_KERNEL_DENSITY", threshold)
    monkeypatch.setattr(tinyprop.autograd, "NATIVE_DEPTHWISE_DENSE_KERNEL_DENSITY", threshold)
    monkeypatch.setattr(tinyprop.autograd, "NATIVE_ONE_CHANNEL_DENSE_KERNEL_DENSITY", threshold)
    monkeypatch.setattr(tinyprop.autograd, "DENSE_KERNEL_DENSITY", threshold)
    monkeypatch.setattr(tinyprop.autograd, "CONV_DENSE_KERNEL_DENSITY", threshold)
    monkeypatch.setattr(tinyprop.autograd, "NATIVE_CONV_MIN_FAN_IN", 0)
    if request.param == "pytorch-only kernels":
        monkeypatch.setattr(tinyprop.native, "can_select", lambda scores: False)
        monkeypatch.setattr(tinyprop.native, "can_backward", lambda x, weight: False)
    return request.param


def plain_gradients(model, x, y):
    model.zero_grad()
    nn.CrossEntropyLoss()(model(x), y).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def tinyprop_gradients(model, x, y, config):
    tinyprop.apply(model, config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    stats = tinyprop.train_step(model, x, y, LOSS, optimizer)
    return {name: p.grad.clone() for name, p in model.named_parameters()}, stats


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize(
    "config",
    [
        tinyprop.TinyPropConfig(policy="full"),
        tinyprop.TinyPropConfig(policy="topk", ratio=1.0),
        tinyprop.TinyPropConfig(policy="tinyprop", s_min=1.0, s_max=1.0, zeta=1.0),
    ],
    ids=["full", "topk-1.0", "tinyprop-all"],
)
def test_keeping_everything_equals_plain_pytorch(name, config, kernel):
    reference = build(name)
    x, y = batch(name)
    expected = plain_gradients(copy.deepcopy(reference), x, y)
    got, stats = tinyprop_gradients(reference, x, y, config)
    assert stats.trained == len(x)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-10, msg=key)


def masked_reference(model, x, y, ratio, dense_last=False):
    """Hand-written meProp: hooks keep the top-k |δ| of every layer output, per sample; the bias
    gradient comes from the full δ (as in the authors' code)."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    if dense_last:
        layers = layers[:-1]
    dense_bias = {}

    def hook_for(layer):
        def mask(grad):  # (B, ...) gradient of the mean loss w.r.t. the layer output
            flat = grad.flatten(1)
            k = int(keep_count(ratio, flat.shape[1]))
            kept = torch.zeros_like(flat)
            # the k largest |δ|, ties to the lower index (a stable sort keeps index order)
            index = flat.abs().sort(dim=1, descending=True, stable=True).indices[:, :k]
            kept.scatter_(1, index, flat.gather(1, index))
            channel_dims = [0] + list(range(2, grad.dim())) if grad.dim() > 2 else [0]
            dense_bias[layer] = grad.sum(channel_dims)
            return kept.view_as(grad)

        return mask

    def attach(layer, inputs, output):
        output.register_hook(hook_for(layer))

    handles = [layer.register_forward_hook(attach) for layer in layers]
    model.zero_grad()
    nn.CrossEntropyLoss()(model(x), y).backward()
    for handle in handles:
        handle.remove()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    names = {m: n for n, m in model.named_modules()}
    for layer, bias_grad in dense_bias.items():
        if layer.bias is not None:
            grads[f"{names[layer]}.bias"] = bias_grad
    return grads


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.7])
def test_fixed_ratio_equals_masked_reference(name, ratio, kernel):
    model = build(name)
    x, y = batch(name)
    expected = masked_reference(copy.deepcopy(model), x, y, ratio)
    got, _ = tinyprop_gradients(model, x, y, tinyprop.TinyPropConfig(policy="topk", ratio=ratio))
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-10, msg=key)


@pytest.mark.parametrize("ratio", [0.05, 0.25, 0.5])
def test_batch_of_one_linear_weight_gradient_has_k_rows(ratio):
    torch.manual_seed(0)  # tanh: no exact-zero gradients, so every kept row is non-zero
    model = nn.Sequential(
        nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 5)
    )
    model = model.double()
    x, y = batch("mlp", size=1)
    got, stats = tinyprop_gradients(
        model, x, y, tinyprop.TinyPropConfig(policy="topk", ratio=ratio)
    )
    for name in ("0", "2", "4"):
        out_features = dict(model.named_modules())[name].out_features
        k = int(keep_count(ratio, out_features))
        assert stats.keep[name].tolist() == [k]
        nonzero_rows = int((got[f"{name}.weight"].abs().sum(1) > 0).sum())
        assert nonzero_rows == k, name


def test_randomk_keeps_k_random_entries_and_differs_from_topk():
    model = build("mlp")
    x, y = batch("mlp", size=1)
    topk, _ = tinyprop_gradients(
        copy.deepcopy(model), x, y, tinyprop.TinyPropConfig(policy="topk", ratio=0.25)
    )
    randomk, stats = tinyprop_gradients(
        model, x, y, tinyprop.TinyPropConfig(policy="randomk", ratio=0.25)
    )
    k = int(keep_count(0.25, 16))
    assert stats.keep["0"].tolist() == [k]
    assert int((randomk["0.weight"].abs().sum(1) > 0).sum()) <= k
    assert not torch.equal(topk["0.weight"], randomk["0.weight"])


def test_plain_backward_outside_train_step_is_sparse_too():
    model = tinyprop.apply(build("mlp"), tinyprop.TinyPropConfig(policy="topk", ratio=0.25))
    x, y = batch("mlp", size=1)
    nn.CrossEntropyLoss()(model(x), y).backward()
    assert int((model[0].weight.grad.abs().sum(1) > 0).sum()) == 4


def test_conv_weight_gradient_rows_follow_kept_channels():
    """Batch of one, depthwise conv: only channels with a kept output position get a gradient."""
    model = tinyprop.apply(build("cnn"), tinyprop.TinyPropConfig(policy="topk", ratio=0.05))
    x, y = batch("cnn", size=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    stats = tinyprop.train_step(model, x, y, LOSS, optimizer)
    k = stats.keep["2"].item()
    assert k == int(keep_count(0.05, 6 * 4 * 4))
    assert int((model[2].weight.grad.flatten(1).abs().sum(1) > 0).sum()) <= k


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_dense_output_layer_keeps_the_last_layer_dense(name):
    model = build(name)
    x, y = batch(name)
    expected = masked_reference(copy.deepcopy(model), x, y, 0.2, dense_last=True)
    config = tinyprop.TinyPropConfig(policy="topk", ratio=0.2, dense_output_layer=True)
    got, stats = tinyprop_gradients(model, x, y, config)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-10, msg=key)
    last = list(stats.keep)[-1]
    assert stats.keep[last].tolist() == [5] * len(x)  # all 5 outputs kept
