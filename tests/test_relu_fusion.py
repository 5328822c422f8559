"""ReLU -> sparse Conv2d or Linear with the ReLU's backward fused into the layer's input
gradient (tinyprop.relu_fusion): the same gradients, kept entries, skips, running maxima and
ledger as the ReLU's own backward, bit for bit, whichever kernel the layer's backward runs."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import tinyprop
from tinyprop import model as tinyprop_model
from tinyprop import native, relu_fusion

pytestmark = pytest.mark.skipif(native.library() is None, reason="needs the native kernels")


def separable_model() -> nn.Module:
    """MobileNet's blocks: BatchNorm -> ReLU -> depthwise 3x3 and -> 1x1 convolutions."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, 2, 1, bias=False),  # (B, 8, 6, 6)
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, 1, 1, groups=8, bias=False),  # depthwise: the plane kernel
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 40, 1),  # fan-in 8: the dense kernels (the ReLU masks after them)
        nn.BatchNorm2d(40),
        nn.ReLU(),
        nn.Conv2d(40, 40, 3, 2, 1, groups=40, bias=False),  # (B, 40, 3, 3)
        nn.BatchNorm2d(40),
        nn.ReLU(),
        nn.Conv2d(40, 16, 1, bias=False),  # fan-in 40: the native kernel, channels-last
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(144, 5),
    )


def mlp() -> nn.Module:
    """An MLP's blocks: Linear -> ReLU -> Linear, twice."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(144, 96), nn.ReLU(), nn.Linear(96, 80), nn.ReLU(),
        nn.Linear(80, 5),
    )  # fmt: skip


CONFIGS = {
    "topk 0.05": tinyprop.TinyPropConfig(policy="topk", ratio=0.05),
    "topk 0.6 (dense kernels)": tinyprop.TinyPropConfig(policy="topk", ratio=0.6),
    "tinypropv2": tinyprop.TinyPropConfig(policy="tinypropv2"),
    "topk unified": tinyprop.TinyPropConfig(policy="topk", ratio=0.1, unified=True),
}


def train(config, fused: bool, threads: int, monkeypatch, build=separable_model, **step):
    """Three steps of the separable model (or ``build``'s); its state, the steps' stats, and
    the ReLU backward passes PyTorch ran (threshold_backward) in the last step. ``step``:
    train_step's keywords (fused_update)."""
    with monkeypatch.context() as patch:
        if not fused:
            patch.setattr(tinyprop_model, "fuse_relus", lambda model, convolutions: [])
        model = tinyprop.apply(build(), config)
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 1, 12, 12, generator=generator), torch.arange(12) % 5
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = nn.CrossEntropyLoss(reduction="none")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        stats = [tinyprop.train_step(model, x, y, loss, optimizer, **step) for _ in range(2)]
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            stats.append(tinyprop.train_step(model, x, y, loss, optimizer, **step))
    finally:
        torch.set_num_threads(previous)
    masks = sum(e.count for e in profiler.key_averages() if e.key == "aten::threshold_backward")
    return model, stats, masks


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_relu_backward_equals_the_relus_own(name, threads, monkeypatch):
    config = CONFIGS[name]
    fused, fused_stats, fused_masks = train(config, True, threads, monkeypatch)
    plain, plain_stats, plain_masks = train(config, False, threads, monkeypatch)
    assert sum(type(m) is relu_fusion.ConvInputReLU for m in fused) == 4
    assert not any(type(m) is relu_fusion.ConvInputReLU for m in plain)
    assert plain_masks == 5  # every ReLU's own backward
    if name == "topk 0.05":  # the native kernels mask the depthwise and 1x1 convolutions' input
        assert fused_masks == 2  # gradients; the ReLU after the last one, and the dense one
    for (key, a), b in zip(fused.state_dict().items(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b), key  # weights, BatchNorm statistics, running maxima
    for a, b in zip(fused_stats, plain_stats, strict=True):
        assert a.macs == b.macs and a.kernels == b.kernels and a.skipped == b.skipped
        assert a.loss == b.loss


@pytest.mark.parametrize("fused_update", [False, True], ids=["gradients", "fused SGD"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_relu_backward_of_an_mlp_equals_the_relus_own(
    name, threads, fused_update, monkeypatch
):  # fmt: skip
    """Linear -> ReLU -> Linear: the native Linear kernel masks the input gradient (with the
    weight gradient, or alone under SGD's fused update), other kernels by threshold_backward."""
    config, step = CONFIGS[name], {"fused_update": fused_update}
    fused, fused_stats, fused_masks = train(config, True, threads, monkeypatch, mlp, **step)
    plain, plain_stats, plain_masks = train(config, False, threads, monkeypatch, mlp, **step)
    assert sum(type(m) is relu_fusion.ConvInputReLU for m in fused) == 2
    assert not any(type(m) is relu_fusion.ConvInputReLU for m in plain)
    assert plain_masks == 2  # every ReLU's own backward
    if name == "topk 0.05":  # the native Linear kernel masks both
        assert fused_masks == 0
    for (key, a), b in zip(fused.state_dict().items(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b), key  # weights, running maxima
    for a, b in zip(fused_stats, plain_stats, strict=True):
        assert a.macs == b.macs and a.kernels == b.kernels and a.skipped == b.skipped
        assert a.loss == b.loss


@pytest.mark.parametrize("batch", [3, 129])
def test_the_linear_kernels_relu_mask_is_threshold_backward(batch):
    """The native Linear kernel's relu_mask against PyTorch's ReLU backward of its input
    gradient, on an input with zeros, positive values and NaN, with and without the weight
    gradient (which the mask leaves as it is), at 1 and 2 threads."""
    generator = torch.Generator().manual_seed(4)
    inputs, outputs = 200, 48
    x = torch.relu(torch.randn(batch, inputs, generator=generator))  # (B, in)
    x[0, :3] = float("nan")
    weight = torch.randn(outputs, inputs, generator=generator)  # (out, in)
    delta = torch.randn(batch, outputs, generator=generator)
    keep = torch.full((batch,), 7)
    _, column, value = native.topk(delta, keep, with_rows=False, total=int(keep.sum()))
    row_start = torch.arange(batch + 1) * 7
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for needs_weight in (True, False):
                plain, plain_weight = native.linear_backward(
                    x, weight, row_start, column, value, True, needs_weight
                )
                masked, masked_weight = native.linear_backward(
                    x, weight, row_start, column, value, True, needs_weight, relu_mask=True
                )
                assert torch.equal(masked, torch.ops.aten.threshold_backward(plain, x, 0))
                assert not torch.equal(masked, plain)  # the mask changed something
                assert torch.equal(masked[0, :3], plain[0, :3])  # NaN in x keeps the gradient
                assert (plain_weight is None) == (masked_weight is None)
                if needs_weight:  # bit for bit, NaN where x had NaN
                    torch.testing.assert_close(
                        masked_weight, plain_weight, rtol=0, atol=0, equal_nan=True
                    )
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("channels_last", [True, False], ids=["1x1 planes", "depthwise"])
def test_the_kernels_relu_mask_is_threshold_backward(channels_last):
    """The native kernels' relu_mask against PyTorch's ReLU backward of their gradient, on an
    input with zeros, positive values and NaN (NaN keeps its gradient, as PyTorch's)."""
    generator = torch.Generator().manual_seed(2)
    batch, channels, side = 3, 6, 5
    x = torch.relu(torch.randn(batch, channels, side, side, generator=generator))
    x[0, 0, 0, :2] = float("nan")
    weight = torch.randn(channels, channels if channels_last else 1, *(1, 1) if channels_last
                         else (3, 3), generator=generator)  # fmt: skip
    delta = torch.randn(batch, channels * side * side, generator=generator)
    keep = torch.full((batch,), 20)
    _, column, value = native.topk(delta, keep, with_rows=False, total=int(keep.sum()))
    row_start = torch.arange(batch + 1) * 20
    results = []
    for relu_mask in (False, True):
        if channels_last:  # 1x1, no padding
            shape = (batch, side, side, channels, channels, 1, 1, side, side, 1, 1, 1, 1, 1)
            grad_input, _ = native.conv_backward(
                native.channels_last(x, (0, 0, 0, 0)), weight.permute(0, 2, 3, 1), shape,
                row_start, column, value, True, True, pads=(0, 0, 0, 0), relu_mask=relu_mask,
            )  # fmt: skip
        else:  # depthwise 3x3, padding 1
            shape = (batch, channels, side, side, channels, 3, 3, side, side, 1, 1, 1, 1, 1, 1)
            shape += (channels,)
            grad_input, _ = native.plane_conv_backward(
                x, weight.reshape(channels, 3, 3), shape, row_start, column, value, True, True,
                relu_mask,
            )  # fmt: skip
        results.append(grad_input)
    plain, masked = results
    expected = torch.ops.aten.threshold_backward(plain, x, 0)
    assert torch.equal(masked, expected)
    assert not torch.equal(masked, plain)  # the mask changed something
    assert masked[0, 0, 0, 0] == plain[0, 0, 0, 0] or plain[0, 0, 0, 0].isnan()


def test_a_relu_output_read_elsewhere_adds_up(monkeypatch):
    """The ReLU's output reaching another node too (called by hand): that node's gradient
    goes through the ReLU's own backward and adds to the fused one at the ReLU's input, the
    same gradients as without the fusion, bit for bit."""
    config = tinyprop.TinyPropConfig(policy="topk", ratio=0.2)
    grads = []
    for fused in (True, False):
        with monkeypatch.context() as patch:
            if not fused:
                patch.setattr(tinyprop_model, "fuse_relus", lambda model, convolutions: [])
            model = tinyprop.apply(separable_model(), config)
        x = torch.randn(4, 1, 12, 12, generator=torch.Generator().manual_seed(3))
        x.requires_grad_()
        relu_output = model[2](model[:2](x))
        assert hasattr(relu_output, relu_fusion.RELU_INPUT) == fused
        out = model[3](relu_output)
        assert not hasattr(relu_output, relu_fusion.RELU_INPUT)  # taken: y is not kept alive
        (out.square().sum() + (relu_output * torch.randn_like(relu_output)).sum()).backward()
        grads.append([x.grad, *(p.grad for p in model[:4].parameters())])
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)
    assert grads[0][0].abs().sum() > 0


def test_hooks_checkpointing_and_in_place_relus_run_unfused():
    config = tinyprop.TinyPropConfig(policy="topk", ratio=0.1)
    model = tinyprop.apply(separable_model(), config)
    x = torch.randn(4, 1, 12, 12)

    def fused_count(run, relus: int) -> int:
        """The ReLUs whose own backward (ReluBackward0's threshold_backward) did not run."""
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            run().sum().backward()
        return relus - sum(
            1
            for event in profiler.events()
            if event.name == "aten::threshold_backward"
            and event.cpu_parent is not None
            and event.cpu_parent.name == "ReluBackward0"
        )

    model(x)  # the first call counts the forward's MACs (under module hooks: unfused)
    assert fused_count(lambda: model(x), 5) == 4  # all but the ReLU before the Flatten
    handle = model[2].register_forward_hook(lambda module, args, output: None)
    assert fused_count(lambda: model[:4](x), 1) == 0
    handle.remove()
    assert fused_count(lambda: model[:4](x), 1) == 1
    checkpointed = lambda: torch.utils.checkpoint.checkpoint(model[:4], x, use_reentrant=False)  # noqa: E731
    assert fused_count(checkpointed, 1) == 0
    in_place = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(inplace=True), nn.Conv2d(4, 4, 1))
    tinyprop.apply(in_place, config)
    assert type(in_place[1]) is nn.ReLU


def test_remove_restores_the_relus():
    model = tinyprop.apply(separable_model())
    assert type(model[2]) is relu_fusion.ConvInputReLU
    assert type(model[13]) is nn.ReLU  # before the Flatten
    assert repr(model[2]) == "ReLU()"
    tinyprop.remove(model)
    assert all(type(m) is nn.ReLU for m in model if isinstance(m, nn.ReLU))
    assert not hasattr(model[2], "tinyprop_fused_convs")
    assert not hasattr(model[2], "_tinyprop_original_class")
