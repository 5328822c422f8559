"""Quantization-aware training (torch.ao.quantization's prepare_qat, convert) and tinyprop:
prepared first, the fake-quantized layers stay dense, named as such, and train as in PyTorch;
prepared after apply, the sparse layers (which prepare_qat skips) are refused."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.ao.quantization as quantization
from torch import nn

import tinyprop

LOSS = nn.CrossEntropyLoss(reduction="none")


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).train()


def prepared(model: nn.Module, qconfig_of_head: bool = True) -> nn.Module:
    """``model`` made quantization-aware (its Linear layers fake-quantize their weight); the
    head keeps no qconfig when ``qconfig_of_head`` is False (it stays a plain Linear)."""
    model.qconfig = quantization.get_default_qat_qconfig("fbgemm")
    if not qconfig_of_head:
        model[2].qconfig = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's notes on torchao and on reduce_range
        return quantization.prepare_qat(model, inplace=True)


def data():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(8, 6, generator=generator), torch.randint(0, 3, (8,), generator=generator)


@pytest.mark.parametrize("loop", ["train_step", "own loop", "evaluation"])
def test_prepare_qat_after_apply_is_refused(loop):
    """prepare_qat swaps modules by their exact class: it skipped tinyprop's layers, and the
    model trained, and converted, with no fake quantization at all, silently."""
    model = tinyprop.apply(mlp(), tinyprop.TinyPropConfig(policy="topk", ratio=0.5))
    prepared(model)
    x, y = data()
    with pytest.raises(ValueError, match="layer '0' was given a qconfig after tinyprop.apply"):
        if loop == "train_step":  # a plain Sequential: the step without a graph
            tinyprop.train_step(model, x, y, LOSS, torch.optim.SGD(model.parameters(), lr=0.1))
        elif loop == "own loop":
            tinyprop.backward(model, LOSS(model(x), y))
        else:
            with torch.no_grad():
                model(x)


def test_prepare_qat_before_apply_keeps_fake_quantized_layers_dense_and_converts():
    """The fake-quantized layer is named as quantization-aware in the dense warning (it
    pointed to register_linear, which would make it sparse without its fake quantization);
    the plain head is sparse; topk 1.0 gives plain PyTorch's gradients; after remove, convert
    quantizes the layer."""
    x, y = data()
    plain = prepared(mlp(), qconfig_of_head=False)
    model = copy.deepcopy(plain)
    with pytest.warns(UserWarning, match=r"0 \(torch.ao.nn.qat.*Linear, quantization-aware"):
        tinyprop.apply(model, tinyprop.TinyPropConfig(policy="topk", ratio=1.0))
    LOSS(plain(x), y).mean().backward()
    stats = tinyprop.backward(model, LOSS(model(x), y))
    assert list(stats.keep) == ["2"]
    expected = {name: p.grad for name, p in plain.named_parameters()}
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, expected[name], rtol=0, atol=0, msg=name)
    tinyprop.remove(model).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensors' deprecation note
        converted = quantization.convert(model)
    assert type(converted[0]) is torch.ao.nn.quantized.Linear


def test_a_model_of_quantization_aware_layers_only_says_they_stay_dense():
    with pytest.raises(ValueError, match=r"qat.*Linear.*fake-quantize their weight"):
        tinyprop.apply(prepared(mlp()))
