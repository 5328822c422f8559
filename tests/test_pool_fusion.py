"""Conv2d -> ReLU -> MaxPool2d with the pooling's and the ReLU's backward fused into the sparse
one (tinyprop.pool_fusion): the same δ, kept entries, gradients, running maxima and ledger as
the three modules' own backward passes, bit for bit, at every thread count (the bias gradient,
where k does not read Y_l, as the float64 sum of δ rounded once)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tinyprop
from tinyprop import native, pool_fusion
from tinyprop.functional import SCALAR_ROWS

pytestmark = pytest.mark.skipif(native.library() is None, reason="needs the native kernels")


@pytest.fixture(autouse=True)
def fuse_small_blocks(monkeypatch):
    """The blocks here are small: fuse them whatever their size."""
    monkeypatch.setattr(pool_fusion, "MIN_ENTRIES", 0)


def quantized(*shape: int, generator: torch.Generator, levels: int = 3) -> torch.Tensor:
    """Values in {-1, -1/2, 0, 1/2, 1} (levels=3: ties everywhere, exact sums)."""
    return torch.randint(-levels + 1, levels, shape, generator=generator).float() / 2


def block_model(generator: torch.Generator, ties: bool) -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # (B, 4, 6, 6)
        nn.Conv2d(4, 8, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=(2, 2), stride=2),  # (B, 8, 3, 3)
        nn.Flatten(),
        nn.Linear(72, 5),
    )
    if ties:  # ties in the pool windows (argmax rule) and in |δ| (the selection's tie rule)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.copy_(quantized(*parameter.shape, generator=generator) / 2)
    return model


def run_step(model, x, y, weights, threads: int, fused: bool):
    """One train_step; the gradients, keep counts, kernels, ledger and running maxima, the
    fused nodes' kernels by name (fused) or the two convolutions' δ by layer name."""
    unpooled, deltas = [], {}
    previous = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        if fused:  # count the fused nodes' backward passes, by kernel
            for kernel in ("relu_unpool", "pooled_topk"):
                function = getattr(native, kernel)
                patch.setattr(
                    native, kernel,
                    lambda *a, f=function, n=kernel, **k: unpooled.append(n) or f(*a, **k),
                )  # fmt: skip
        else:
            patch.setattr(pool_fusion, "fusable_node", lambda pool, input: None)
            for name in ("0", "3"):  # δ of the convolutions' outputs

                def keep_delta(module, args, output, name=name):
                    output.register_hook(lambda grad: deltas.__setitem__(name, grad.clone()))

                model[int(name)].register_forward_hook(keep_delta)
        torch.set_num_threads(threads)
        try:
            loss = nn.CrossEntropyLoss(reduction="none")

            def weighted(output, target):  # zero-gradient samples: rows whose δ is all zero
                return loss(output, target) * weights

            optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
            tinyprop.train_step(model, x, y, weighted, optimizer)  # counts the forward's MACs
            unpooled.clear()  # (under a FlopCounterMode, whose module hooks keep it unfused)
            stats = tinyprop.train_step(model, x, y, weighted, optimizer)
        finally:
            torch.set_num_threads(previous)
    assert len(unpooled) == (2 if fused and stats.trained else 0)
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    maxima = {name: b.clone() for name, b in model.named_buffers()}
    return grads, stats, maxima, unpooled if fused else deltas


CONFIGS = {
    "topk 0.05": tinyprop.TinyPropConfig(policy="topk", ratio=0.05),
    "topk 0.6 (k above the non-zero entries)": tinyprop.TinyPropConfig(policy="topk", ratio=0.6),
    "tinypropv2": tinyprop.TinyPropConfig(policy="tinypropv2"),
    "tinyprop": tinyprop.TinyPropConfig(policy="tinyprop"),
    "randomk": tinyprop.TinyPropConfig(policy="randomk", ratio=0.1),
    "topk unified": tinyprop.TinyPropConfig(policy="topk", ratio=0.1, unified=True),
    "topk skip zero entries": tinyprop.TinyPropConfig(
        policy="topk", ratio=0.3, skip_zero_entries=True
    ),
}


@pytest.mark.parametrize(  # a few rows (Python floats), or more (the tensor bookkeeping)
    "batch", [12, SCALAR_ROWS + 16], ids=["12 rows", "more than SCALAR_ROWS"]
)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("ties", [True, False], ids=["ties", "continuous"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_pool_backward_equals_the_modules_own(name, ties, threads, batch):
    generator = torch.Generator().manual_seed(len(name) * 7 + ties + threads + batch)
    template = block_model(generator, ties)
    if ties:
        x = quantized(batch, 1, 12, 12, generator=generator)
    else:
        x = torch.randn(batch, 1, 12, 12, generator=generator)
    x[3] = -1.0  # with a ReLU'd first layer, windows of equal (often zero) values
    y = torch.randint(0, 5, (batch,), generator=generator)
    weights = torch.ones(batch)
    weights[[1, 6]] = 0.0  # their δ is zero at every layer
    results = []
    for fused in (True, False):
        model = tinyprop.apply(copy.deepcopy(template), CONFIGS[name])
        if fused:  # the fused node runs for both blocks
            output = model[:6](x)
            assert type(output.grad_fn).__name__ == "PooledSparseBackpropBackward"
            assert type(model[:3](x).grad_fn).__name__ == "PooledSparseBackpropBackward"
        results.append(run_step(model, x, y, weights, threads, fused))
    (fused_grads, fused_stats, fused_buffers, kernels), (grads, stats, buffers, deltas) = results
    if name == "topk 0.05":  # plain top-k: δ never written, selected from the pooled entries
        assert kernels == ["pooled_topk", "pooled_topk"]
    sums_in_float64 = CONFIGS[name].policy not in ("tinyprop", "tinypropv2")
    for key, value in grads.items():  # bit for bit, signs of zeros included
        if sums_in_float64 and key in ("0.bias", "3.bias"):  # Σ δ in float64, rounded once
            expected = deltas[key[0]].double().sum((0, 2, 3)).float()
            assert torch.equal(fused_grads[key], expected), key
            rounding = 1e-6 * float(deltas[key[0]].abs().sum())  # the float32 sum's error
            assert torch.allclose(fused_grads[key], value, rtol=0, atol=rounding), key
            continue
        assert torch.equal(fused_grads[key].view(torch.int32), value.view(torch.int32)), key
    for key, value in buffers.items():
        assert torch.equal(fused_buffers[key], value), key
    assert fused_stats.kernels == stats.kernels
    assert fused_stats.macs == stats.macs
    assert fused_stats.keep.keys() == stats.keep.keys()
    for key, value in stats.keep.items():
        assert torch.equal(fused_stats.keep[key], value), key


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "shape, kernel, stride",
    [
        ((5, 3, 9, 11), 2, None),
        ((2, 3, 6, 37), 2, None),  # 18 windows a row: a block of 16, then 2
        ((3, 5, 7, 8), (2, 3), (2, 3)),
        ((2, 9, 12, 12), 3, 3),
    ],
    ids=["2x2 odd sides", "2x2 wide", "2x3", "3x3"],
)
@pytest.mark.parametrize(
    "forward",
    [
        pool_fusion.pool_forward,
        pool_fusion.channels_last_pool,
        lambda relu, pool: native.max_pool(relu, pool_fusion._pair(pool.kernel_size)),
    ],
    ids=["pool_forward", "channels_last_pool", "native max_pool"],
)
def test_the_fused_pool_forward_gives_the_plain_pooling(
    threads, shape, kernel, stride, forward, monkeypatch
):
    """The fused node's pooling (the native kernel's, or PyTorch's kernel on a channels-last
    copy) against the module's own on contiguous input: the same maxima and window indices
    bit for bit, with NaN, +inf, ties and all-zero windows (each window's first maximum, its
    last NaN), and contiguous, as the module returns them."""
    generator = torch.Generator().manual_seed(11)
    y = quantized(*shape, generator=generator)  # ties and zero windows behind the ReLU
    y[0] = torch.randn(shape[1:], generator=generator)
    y[0, 0, 1, :5] = torch.tensor([float("nan"), 1.0, float("nan"), 2.0, float("inf")])
    y[-1, -1] = float("nan")
    relu = torch.relu(y)
    pool = nn.MaxPool2d(kernel, stride)
    monkeypatch.setattr(native, "LAYOUT_GRAIN", 1)  # split even these small inputs
    torch.set_num_threads(threads)
    try:
        expected = nn.functional.max_pool2d_with_indices(relu, pool.kernel_size, pool.stride)
        pooled, indices = forward(relu, pool)
    finally:
        torch.set_num_threads(1)
    assert pooled.is_contiguous() and indices.is_contiguous()
    assert torch.equal(pooled.view(torch.int32), expected[0].view(torch.int32))
    assert torch.equal(indices, expected[1])


@pytest.mark.parametrize(
    "x, window",
    [(torch.zeros(3, 4, 4), (2, 2)), (torch.zeros(1, 1, 4, 4, dtype=torch.float64), (2, 2)),
     (torch.zeros(1, 1, 4, 3), (2, 4)), (torch.zeros(1, 1, 4, 4), (0, 2))],
    ids=["3-d", "float64", "wider than x", "empty window"],
)  # fmt: skip
def test_native_max_pool_names_bad_input(x, window):
    with pytest.raises(ValueError, match="pass x \\(B, C, H, W\\) float32"):
        native.max_pool(x, window)


def test_relu_unpool_equals_max_pooling_then_relu_backward():
    """NaN, ±inf, -0.0 and ties in the ReLU'd input; NaN, -0.0 and zeros in the gradient."""
    generator = torch.Generator().manual_seed(3)
    y = quantized(3, 5, 8, 10, generator=generator)
    y[0, 0, 0, :4] = torch.tensor([float("nan"), 1.0, 2.0, -0.0])
    y[1, 2, 2:4, 2:4] = float("inf")
    relu = torch.relu(y)
    pooled, indices = nn.functional.max_pool2d_with_indices(relu, 2)  # (3, 5, 4, 5)
    grad = quantized(*pooled.shape, generator=generator)
    grad[0, 0, 0, 0] = float("nan")
    grad[2, 1, 1, :] = -0.0
    expected = torch.ops.aten.max_pool2d_with_indices_backward(
        grad, relu, [2, 2], [2, 2], [0, 0], [1, 1], False, indices
    )
    expected = torch.ops.aten.threshold_backward(expected, relu, 0)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        delta = native.relu_unpool(grad, pooled, indices, y.shape)
        assert torch.equal(delta.view(torch.int32), expected.view(torch.int32))
    torch.set_num_threads(1)


@pytest.mark.parametrize("threads", [1, 2])
def test_pooled_topk_selects_and_sums_as_the_written_delta(threads):
    """pooled_topk (δ never written) against relu_unpool's δ and native.topk: the same kept
    entries and values bit for bit, for k below, at and above a row's non-zero entries, with
    zero rows and ties; Σ |δ| and Σ δ are relu_unpool's and the float64 sums of δ rounded
    once; a NaN row gives None (the written path reports it)."""
    generator = torch.Generator().manual_seed(5 + threads)
    y = torch.randn(7, 6, 8, 10, generator=generator)
    y[2] = -1.0  # a zero row: every window's maximum behind the ReLU is 0
    y[4, :, :, :5] = 0.5  # ties in the windows and in |δ|
    relu = torch.relu(y)
    pooled, indices = nn.functional.max_pool2d_with_indices(relu, 2)  # (7, 6, 4, 5)
    grad = torch.randn(pooled.shape, generator=generator)
    grad[5] = quantized(*grad.shape[1:], generator=generator)  # ties in |δ|
    torch.set_num_threads(threads)
    try:
        delta, row_abs, channel_sum = native.relu_unpool(grad, pooled, indices, y.shape, True)
        assert torch.equal(delta, native.relu_unpool(grad, pooled, indices, y.shape))
        flat = delta.reshape(7, -1)  # (B, N)
        assert torch.equal(row_abs, flat.double().abs().sum(1).float())
        assert torch.equal(channel_sum, delta.double().sum((0, 2, 3)).float())
        for keep in (1, 12, 24, 100, 480):  # about 120 non-zero entries a row
            columns, values, pooled_abs, pooled_sum = native.pooled_topk(
                grad, pooled, indices, y.shape, keep
            )
            _, expected_columns, expected_values = native.topk(
                flat, torch.full((7,), keep), with_rows=False
            )
            assert torch.equal(columns, expected_columns), keep
            assert torch.equal(values.view(torch.int32), expected_values.view(torch.int32))
            assert torch.equal(pooled_abs, row_abs) and torch.equal(pooled_sum, channel_sum)
        grad[3, 1, 2, 2] = float("nan")
        pooled[3, 1, 2, 2] = 1.0
        assert native.pooled_topk(grad, pooled, indices, y.shape, 12) is None
        with pytest.raises(ValueError, match="keep 481 in"):
            native.pooled_topk(grad, pooled, indices, y.shape, 481)
    finally:
        torch.set_num_threads(1)


def test_a_block_output_read_elsewhere_is_an_error_not_a_wrong_gradient():
    """The convolution's output reaching another node besides the fused pooling (called by
    hand here, so nothing guarantees the nn.Sequential's single path)."""
    model = tinyprop.apply(block_model(torch.Generator().manual_seed(0), False),
                           tinyprop.TinyPropConfig(policy="topk", ratio=0.1))  # fmt: skip
    x = torch.randn(4, 1, 12, 12)
    conv_output = model[0](x)
    pooled = model[2](model[1](conv_output))
    with pytest.raises(RuntimeError, match="reached another node besides the max pooling"):
        (pooled.sum() + conv_output.sum()).backward()


def test_hooks_checkpointing_and_other_pools_run_unfused():
    generator = torch.Generator().manual_seed(1)
    config = tinyprop.TinyPropConfig(policy="topk", ratio=0.1)
    x = torch.randn(4, 1, 12, 12)
    model = tinyprop.apply(block_model(generator, False), config)
    handle = model[1].register_forward_hook(lambda module, args, output: None)
    assert type(model[:3](x).grad_fn).__name__ == "PooledSparseBackpropBackward"  # ReLU's: fine
    handle.remove()
    handle = model[2].register_forward_hook(lambda module, args, output: None)
    assert type(model[:3](x).grad_fn).__name__ == "MaxPool2DWithIndicesBackward0"
    handle.remove()
    checkpointed = torch.utils.checkpoint.checkpoint(model[:3], x, use_reentrant=False)
    assert type(checkpointed.grad_fn).__name__ == "MaxPool2DWithIndicesBackward0"
    overlapping = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(3, stride=2))
    padded = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2, padding=1))
    apart = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Sigmoid(), nn.ReLU(), nn.MaxPool2d(2))
    for plain in (overlapping, padded, apart):
        tinyprop.apply(plain, config)
        assert all(type(module) is not pool_fusion.FusedMaxPool2d for module in plain)


def test_small_blocks_run_unfused(monkeypatch):
    """Below MIN_ENTRIES entries the fused node costs more than the passes it saves."""
    monkeypatch.setattr(pool_fusion, "MIN_ENTRIES", 1 << 18)
    model = tinyprop.apply(block_model(torch.Generator().manual_seed(0), False))
    assert type(model[:3](torch.randn(4, 1, 12, 12)).grad_fn).__name__ == (
        "MaxPool2DWithIndicesBackward0"
    )
    large = torch.randn(4, 1, 256, 256)  # 4 x 4 x 256 x 256 = 2^20 entries after the conv
    assert type(model[:3](large).grad_fn).__name__ == "PooledSparseBackpropBackward"


def test_remove_restores_the_pools():
    model = tinyprop.apply(block_model(torch.Generator().manual_seed(0), False))
    assert type(model[2]) is pool_fusion.FusedMaxPool2d
    assert repr(model[2]).startswith("MaxPool2d(")
    tinyprop.remove(model)
    assert type(model[2]) is nn.MaxPool2d and type(model[5]) is nn.MaxPool2d
    assert not hasattr(model[2], "tinyprop_fused_convs")
    assert not hasattr(model[2], "_tinyprop_original_class")


def test_an_applied_model_with_fused_pools_exports():
    """The exporter reads the pools as the nn.MaxPool2d they compute."""
    from tinyprop.export.graph import _check_computes_its_base

    model = tinyprop.apply(block_model(torch.Generator().manual_seed(0), False))
    _check_computes_its_base("2", model[2])  # raised: a subclass with its own forward
