"""Half precision: a model cast to bfloat16 / float16, and float32 under torch.autocast, train
with every policy; k is the float32 run's up to the rounding of the local errors."""

from __future__ import annotations

import copy

import pytest
import torch
from model_zoo import zoo

import tinyprop

POLICIES = ["full", "topk", "randomk", "tinyprop", "tinypropv2"]
MODELS = ["mlp", "cnn", "per_token", "encoder_seq_first"]


def run(name: str, policy: str, mode: str, steps: int = 3):
    """Train a few steps; returns the step stats and the final parameters."""
    model, (x,), y, loss_fn = zoo(size=6, seed=1)[name]()
    model = model.float()
    x = x.float()
    config = tinyprop.TinyPropConfig(policy=policy, ratio=0.2, skip_threshold=0.3)
    if mode in ("bfloat16", "float16"):
        model = model.to(getattr(torch, mode))
        x = x.to(getattr(torch, mode))
    tinyprop.apply(model, config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    history = []
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
            stats = tinyprop.train_step(model, x, y, loss_fn, optimizer)
        history.append(stats)
    return history, model


@pytest.mark.parametrize("mode", ["bfloat16", "float16", "autocast"])
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name", MODELS)
def test_half_precision_trains_like_float32(name, policy, mode):
    reference, _ = run(name, policy, "float32")
    history, model = run(name, policy, mode)
    for step, (stats, expected) in enumerate(zip(history, reference, strict=True)):
        assert torch.isfinite(torch.tensor(stats.loss))
        assert stats.loss == pytest.approx(expected.loss, rel=0.1, abs=0.05)
        assert stats.keep.keys() == expected.keep.keys()
        for layer, keep in stats.keep.items():
            if policy in ("topk", "randomk"):  # k depends on N only
                assert torch.equal(keep, expected.keep[layer]), layer
            elif step == 0 and keep.numel() == expected.keep[layer].numel():
                # adaptive: k follows Y_l / Ymax_l, which half precision rounds
                total, reference_total = int(keep.sum()), int(expected.keep[layer].sum())
                assert abs(total - reference_total) <= max(2, 0.1 * reference_total), layer
    for parameter in model.parameters():
        assert torch.isfinite(parameter.float()).all()
        assert parameter.dtype == (torch.float32 if mode == "autocast" else getattr(torch, mode))


def test_bfloat16_gradient_is_close_to_float32():
    model, (x,), y, loss_fn = zoo(size=6, seed=1)["mlp"]()
    model = model.float()
    half = copy.deepcopy(model).to(torch.bfloat16)
    config = tinyprop.TinyPropConfig(policy="topk", ratio=1.0)
    grads = []
    for net, inputs in ((model, x.float()), (half, x.to(torch.bfloat16))):
        tinyprop.apply(net, config)
        tinyprop.backward(net, loss_fn(net(inputs), y))
        grads.append([p.grad.float() for p in net.parameters()])
    for full, low in zip(*grads, strict=True):
        torch.testing.assert_close(low, full, rtol=0.05, atol=0.02)


def large_error_step(model, dtype, config):
    """One tinyprop.backward whose local errors lie past float16's 65504 (small inputs keep the
    gradients themselves in range)."""
    x = torch.randn(8, 12, generator=torch.Generator().manual_seed(0)).to(dtype) * 1e-3
    output = model(x)
    return tinyprop.backward(model, (output.float() * 20000).sum(1), output)


def running_maxima(model) -> list[float]:
    layers = [layer.error_max for _, layer in tinyprop.model.state_of(model).layers]
    return [float(value) for value in [*layers, model.tinyprop_output_error_max]]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_model_keeps_running_maxima_past_float16_range(dtype):
    from core_models import mlp

    torch.manual_seed(0)
    reference = mlp()
    config = tinyprop.TinyPropConfig(policy="tinypropv2")
    model = tinyprop.apply(copy.deepcopy(reference), config).to(dtype)
    tinyprop.apply(reference, config)
    for _ in range(2):  # the second step reads the first step's maxima
        stats, expected = (
            large_error_step(model, dtype, config),
            large_error_step(reference, torch.float32, config),
        )
        assert stats.trained == expected.trained  # was 0: Ymax inf, every sample skipped
    maxima = running_maxima(model)
    assert max(maxima) > 65504 and all(torch.isfinite(torch.tensor(maxima)))
    assert maxima == pytest.approx(running_maxima(reference), rel=0.05)
    fresh = tinyprop.apply(mlp(), config).to(dtype)
    fresh.load_state_dict(model.state_dict())  # was refused: "a running maximum ... is inf"
    assert running_maxima(fresh) == running_maxima(model)


def test_half_cast_after_training_keeps_layer_maxima_and_restarts_an_overflowed_output_max():
    from core_models import mlp

    torch.manual_seed(0)
    model = tinyprop.apply(mlp(), tinyprop.TinyPropConfig(policy="tinypropv2"))
    large_error_step(model, torch.float32, None)
    before = running_maxima(model)
    model.half()
    assert running_maxima(model)[:-1] == before[:-1]  # the layers' Ymax_l survive the cast
    with pytest.warns(UserWarning, match="tinyprop_output_error_max.*became inf"):
        stats = large_error_step(model, torch.float16, None)
    assert stats.trained > 0 and all(torch.isfinite(torch.tensor(running_maxima(model))))


def default_dtype_gradients(default: torch.dtype, policy: str) -> tuple[dict, dict]:
    """A float32 MLP and CNN (fan-in 40 · 9: the native kernels) trained one step with torch's
    default dtype set to ``default`` while the model is applied and backpropagated; returns
    the gradients and tinyprop's buffer dtypes."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(40, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(16 * 25, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3),
    )  # fmt: skip
    x, y = torch.randn(4, 40, 5, 5), torch.randint(0, 3, (4,))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        tinyprop.apply(model, tinyprop.TinyPropConfig(policy=policy, ratio=0.05))
        loss = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
        stats = tinyprop.backward(model, loss)
    finally:
        torch.set_default_dtype(previous)
    grads = {name: p.grad for name, p in model.named_parameters()}
    return grads, {name: b.dtype for name, b in model.named_buffers()}, stats.kernels


@pytest.mark.parametrize("default", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("policy", ["topk", "randomk"])
def test_a_float32_model_under_another_default_dtype_gets_the_float32_default_gradients(
    default, policy
):
    """The native kernels' outputs were allocated in torch's default dtype: under float64 the
    float32 values filled half of each tensor (gradients silently wrong, up to inf), under
    float16 / bfloat16 (Lightning's precision="bf16-true" sets it while training_step runs,
    manual_backward included) the kernels wrote past their end (heap corruption, abort)."""
    expected, expected_dtypes, kernels = default_dtype_gradients(torch.float32, policy)
    assert "native sparse" in kernels.values() or not tinyprop.native.library()
    got, dtypes, _ = default_dtype_gradients(default, policy)
    for name, grad in expected.items():
        assert torch.equal(got[name], grad), name
    assert dtypes == expected_dtypes  # Ymax_l, Ymax_L float32 under a float16 default too


def complex_model(dtype=torch.complex64) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    return model.to(dtype), torch.randn(4, 6, dtype=torch.complex64), torch.arange(4) % 3


def complex_losses(output, y):  # real per-sample losses of a complex output
    return torch.nn.functional.cross_entropy(output.abs(), y, reduction="none")


@pytest.mark.parametrize("policy", ["topk", "tinyprop", "tinypropv2"])
@pytest.mark.parametrize("when", ["before apply", "after apply"])
def test_complex_layers_are_refused_by_sparse_policies_and_train_under_full(policy, when):
    """A complex Linear failed inside the backward with PyTorch's '"aminmax_cpu" not
    implemented for 'ComplexFloat'', naming neither the layer nor tinyprop; now the forward
    names the layer and the way out, and ``full`` trains as plain PyTorch."""
    model, x, y = complex_model(torch.float32 if when == "after apply" else torch.complex64)
    tinyprop.apply(model, tinyprop.TinyPropConfig(policy=policy))
    model = model.to(torch.complex64)
    with pytest.raises(TypeError, match=r"layer '0' has a complex weight.*'full' policy"):
        tinyprop.backward(model, complex_losses(model(x), y))
    tinyprop.remove(model)
    model.zero_grad()
    plain = copy.deepcopy(model)
    tinyprop.apply(model, tinyprop.TinyPropConfig(policy="full"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    plain_optimizer = torch.optim.SGD(plain.parameters(), lr=0.1)
    for _ in range(2):
        tinyprop.train_step(model, x, y, complex_losses, optimizer)
        plain_optimizer.zero_grad()
        complex_losses(plain(x), y).mean().backward()
        plain_optimizer.step()
    for got, expected in zip(model.parameters(), plain.parameters(), strict=True):
        assert got.dtype == torch.complex64 and torch.equal(got, expected)
