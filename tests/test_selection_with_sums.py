"""Fixed-ratio top-k's selection with each row's Σ |δ| in one native pass
(tinyprop.native.topk_with_sums, used by tinyprop.autograd.fixed_native_keep): the same kept
entries, gradients and records as the selection after PyTorch's Σ |δ|."""

import pytest
import torch
from torch import nn

import tinyprop
import tinyprop.autograd
from tinyprop import native

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler")


def rows_of_every_kind(rows: int = 12, size: int = 3000) -> torch.Tensor:
    """(rows, size) float32: continuous, mostly zeros, ties, denormals, and all-zero rows."""
    generator = torch.Generator().manual_seed(0)
    delta = torch.randn(rows, size, generator=generator)
    delta[1][torch.rand(size, generator=generator) < 0.9] = 0
    delta[2] = torch.randint(-2, 3, (size,), generator=generator).float()
    delta[3] = delta[3] * 1e-40
    delta[4] = 0
    delta[7] = 0
    delta[8, :5] = 0.5  # fewer non-zero entries than k: the first zeros fill the row
    delta[8, 5:] = 0
    return delta


def lane_order_sums(delta: torch.Tensor, lanes: int = 32) -> torch.Tensor:
    """(R,) float32 Σ |δ| of each row of ``delta`` (R, N) summed as the native kernel sums it:
    entry i into lane i mod 32 in float64, in order, then the lanes one after the other (the
    zeros padding the last block add nothing; cumsum adds in order)."""
    rows, size = delta.shape
    padded = torch.zeros(rows, -(-size // lanes) * lanes, dtype=torch.float64)
    padded[:, :size] = delta.double().abs()
    lane = padded.view(rows, -1, lanes).cumsum(1)[:, -1]  # (R, 32)
    return lane.cumsum(1)[:, -1].float()


@pytest.mark.parametrize("keep", [1, 7, 150, 3000])
@pytest.mark.parametrize("threads", [1, 2, 4])
def test_topk_with_sums_keeps_what_topk_keeps_and_nothing_of_zero_rows(keep, threads, monkeypatch):
    monkeypatch.setattr(native, "SELECTION_GRAIN", 1)  # a part per row or so
    delta = rows_of_every_kind()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        sums, row_start, columns, values = native.topk_with_sums(delta, keep)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(sums, delta.abs().sum(1), rtol=1e-6, atol=0)
    assert torch.equal(sums, lane_order_sums(delta))  # bit for bit, whichever path summed
    nonzero = (delta != 0).any(1)
    assert torch.equal(sums != 0, nonzero)  # exactly 0 on the zero rows (denormals are not)
    counts = torch.where(nonzero, keep, 0)
    assert torch.equal(row_start, torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]))
    rows = nonzero.nonzero().flatten()
    _, expected_columns, expected_values = native.topk(delta[rows], counts[rows])
    assert torch.equal(columns, expected_columns)
    assert torch.equal(values, expected_values)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), "overflow"])
def test_topk_with_sums_leaves_rows_not_finite_or_near_overflow_to_the_caller(bad):
    """None (the caller's own Σ |δ| and checks decide): a NaN or ±Inf entry, or finite entries
    whose sum is within 1% of float32's largest value, where another summation order could
    round to inf."""
    delta = rows_of_every_kind()
    if bad == "overflow":
        delta[5, :2] = torch.finfo(torch.float32).max / 2
    else:
        delta[5, 10] = bad
    assert native.topk_with_sums(delta, 20) is None
    with pytest.raises(ValueError, match="keep must be in"):
        native.topk_with_sums(rows_of_every_kind(), 0)
    with pytest.raises(ValueError, match="float32"):
        native.topk_with_sums(rows_of_every_kind().double(), 3)


@pytest.mark.parametrize("threads", [1, 2, 3, 4])
def test_column_sums_are_pytorchs_bit_for_bit(threads):
    """With ``column_sums``, Σ δ over the rows from the selection's read of δ: what
    ``delta.sum((0, 2))`` of the layer's (R, C_out, 1) δ gives (the bias gradient), bit for bit,
    at every thread count, for row counts around PyTorch's groups of 16 rows and its levels
    (256, 4096 rows), on entries spanning many magnitudes (where the order of the sum shows)."""
    generator = torch.Generator().manual_seed(3)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for rows, size in [(1, 32), (15, 64), (16, 2048), (17, 96), (64, 2048), (100, 160),
                           (128, 2048), (257, 64), (4100, 32)]:  # fmt: skip
            spread = torch.exp(6 * torch.randn(rows, size, generator=generator))
            delta = torch.randn(rows, size, generator=generator) * spread  # (R, N)
            keep = max(1, size // 20)
            sums, row_start, columns, values, column_sum = native.topk_with_sums(
                delta, keep, column_sums=True
            )
            expected = delta.view(rows, 1, size).transpose(1, 2).sum((0, 2))  # (N,)
            assert torch.equal(column_sum, expected), (rows, size)
            if rows > 16:  # the order shows: the sum in float64, rounded once, is another
                assert not torch.equal(column_sum, delta.double().sum(0).float()), (rows, size)
            for got, alone in zip((sums, row_start, columns, values),
                                  native.topk_with_sums(delta, keep), strict=True):  # fmt: skip
                assert torch.equal(got, alone)
    finally:
        torch.set_num_threads(before)


def test_column_sums_are_left_to_the_caller_where_pytorch_sums_otherwise():
    """None for the fifth item: a zero row (the caller sums the rows it keeps) or a width that
    is not a multiple of 32 (PyTorch adds its last columns in another order)."""
    delta = torch.randn(40, 64)
    delta[7] = 0
    *selected, column_sum = native.topk_with_sums(delta, 3, column_sums=True)
    assert column_sum is None and selected[1][-1] == 39 * 3
    assert native.topk_with_sums(torch.randn(40, 48), 3, column_sums=True)[4] is None
    assert not native.sums_columns_as_torch(40, 48) and native.sums_columns_as_torch(40, 64)


@pytest.mark.parametrize("threads", [1, 2])
def test_linear_bias_gradients_from_the_selection_equal_pytorchs_sum(threads, monkeypatch):
    """A wide MLP's hidden Linear layers take their bias gradient Σ δ from the selection's
    read of δ (no separate pass): weights, biases and momentum bit for bit as with PyTorch's
    ``delta.sum``, over three steps; with a sample whose δ is zero the layer sums itself."""
    taken = []
    original = native.topk_with_sums

    def spy(*args, **kwargs):
        result = original(*args, **kwargs)
        if kwargs.get("column_sums") and result is not None:
            taken.append((args[0].shape[1], result[4] is not None))  # (N, native Σ δ)
        return result

    monkeypatch.setattr(native, "topk_with_sums", spy)
    generator = torch.Generator().manual_seed(4)
    batches = [(torch.randn(48, 40, generator=generator), torch.randint(0, 5, (48,)))
               for _ in range(3)]  # fmt: skip
    weights = torch.ones(48)

    def loss(output, target):
        return nn.functional.cross_entropy(output, target, reduction="none") * weights

    def train(native_sums: bool):
        torch.manual_seed(0)
        layers = nn.Sequential(nn.Linear(40, 256), nn.ReLU(), nn.Linear(256, 96), nn.ReLU(),
                               nn.Linear(96, 5))  # fmt: skip
        model = tinyprop.apply(layers, tinyprop.TinyPropConfig(policy="topk", ratio=0.05))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        with monkeypatch.context() as patch:
            if not native_sums:
                patch.setattr(native, "sums_columns_as_torch", lambda rows, size: False)
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                for x, y in batches:
                    tinyprop.train_step(model, x, y, loss, optimizer)
            finally:
                torch.set_num_threads(before)
        return model, optimizer

    for zero_row in (False, True):
        weights[5] = 0.0 if zero_row else 1.0
        taken.clear()
        summed, summed_optimizer = train(native_sums=False)
        assert taken == [(5, False), (96, False), (256, False)] * 3  # output layer first
        taken.clear()
        native_model, native_optimizer = train(native_sums=True)
        assert taken == [(5, False), (96, not zero_row), (256, not zero_row)] * 3  # 5: not 32 k
        for (name, value), expected in zip(
            native_model.state_dict().items(), summed.state_dict().values(), strict=True
        ):
            assert torch.equal(value, expected), name
        for state, expected in zip(
            native_optimizer.state.values(), summed_optimizer.state.values(), strict=True
        ):
            assert torch.equal(state["momentum_buffer"], expected["momentum_buffer"])


def depthwise_separable_cnn() -> nn.Module:
    """The speed benchmark's MobileNet-style block at a small size: a first conv on one channel,
    a depthwise and a pointwise conv with BatchNorm and ReLU, a linear head."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),  # (B, 8, 6, 6)
        nn.Conv2d(8, 8, 3, 1, 1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 32, 1, bias=True), nn.BatchNorm2d(32), nn.ReLU(),  # fan-in 8: dense
        nn.Conv2d(32, 32, 1), nn.ReLU(),  # fan-in 32: the native convolution kernel
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4),
    )  # fmt: skip


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("policy", ["topk", "tinyprop"])
def test_training_with_the_summed_selection_equals_the_separate_one(threads, policy, monkeypatch):
    """Three steps with samples whose loss (so δ) is zero in every layer: the same k, kept
    rows, kernels, ledger and weights bit for bit with and without the one-pass selection
    (``tinyprop`` never takes it: k follows Y_l there)."""
    for name in ("SELECTION_GRAIN", "BACKWARD_GRAIN", "LAYOUT_GRAIN"):
        monkeypatch.setattr(native, name, 1)
    calls = []
    original = native.topk_with_sums
    monkeypatch.setattr(
        native, "topk_with_sums", lambda *a, **k: calls.append(a[1]) or original(*a, **k)
    )  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(8, 1, 12, 12, generator=generator), torch.randint(0, 4, (8,)))
        for _ in range(3)
    ]
    trained = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1.0])  # two samples' δ is zero

    def loss(output, target):
        return nn.functional.cross_entropy(output, target, reduction="none") * trained

    def train(summed: bool):
        torch.manual_seed(0)
        model = tinyprop.apply(
            depthwise_separable_cnn(), tinyprop.TinyPropConfig(policy=policy, ratio=0.1)
        )
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        ledger = tinyprop.Ledger()
        with monkeypatch.context() as patch:
            if not summed:
                patch.setattr(tinyprop.autograd, "fixed_native_keep", lambda *a: None)
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                stats = [tinyprop.train_step(model, x, y, loss, optimizer) for x, y in batches]
            finally:
                torch.set_num_threads(before)
        for step in stats:
            ledger += step.macs
        return model, stats, ledger

    separate, separate_stats, separate_ledger = train(summed=False)
    assert not calls
    summed, summed_stats, summed_ledger = train(summed=True)
    # a step's depthwise and 32 -> 32 convolutions (the first one's 10% is past its native
    # limit) and the Linear head (k = 1 of 4)
    assert len(calls) == (9 if policy == "topk" else 0)
    for step, expected in zip(summed_stats, separate_stats, strict=True):
        assert step.kernels == expected.kernels
        assert step.kernels["3"] == tinyprop.autograd.NATIVE_SPARSE
        for name, keep in step.keep.items():
            assert torch.equal(keep, expected.keep[name]), name
    assert summed_ledger.ratio() == separate_ledger.ratio()
    for (name, value), expected in zip(
        summed.state_dict().items(), separate.state_dict().values(), strict=True
    ):
        assert torch.equal(value, expected), name


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("fused_update", [False, True], ids=["gradients", "fused SGD"])
@pytest.mark.parametrize("batch", [8, 128])
def test_linear_layers_with_the_summed_selection_equal_the_separate_one(
    batch, fused_update, threads, monkeypatch
):
    """An MLP's Linear layers take Σ |δ| and their kept entries from one native call: the
    same k, kernels, ledger, weights and SGD-momentum state bit for bit as Σ |δ| by PyTorch
    then the selection, with samples whose δ is zero, also when SGD's update is fused into
    the kernel (train_step(fused_update=True)) and at 128 rows."""
    for name in ("SELECTION_GRAIN", "BACKWARD_GRAIN"):
        monkeypatch.setattr(native, name, 1)
    calls = []
    original = native.topk_with_sums
    monkeypatch.setattr(
        native, "topk_with_sums", lambda *a, **k: calls.append(a[1]) or original(*a, **k)
    )  # fmt: skip
    generator = torch.Generator().manual_seed(2)
    batches = [
        (torch.randn(batch, 24, generator=generator), torch.randint(0, 5, (batch,)))
        for _ in range(3)
    ]
    trained = torch.ones(batch)
    trained[1::3] = 0  # their δ is zero in every layer

    def loss(output, target):
        return nn.functional.cross_entropy(output, target, reduction="none") * trained

    def train(summed: bool):
        torch.manual_seed(0)
        layers = nn.Sequential(nn.Linear(24, 200), nn.ReLU(), nn.Linear(200, 60), nn.ReLU(),
                               nn.Linear(60, 5))  # fmt: skip
        model = tinyprop.apply(layers, tinyprop.TinyPropConfig(policy="topk", ratio=0.05))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        with monkeypatch.context() as patch:
            if not summed:
                patch.setattr(tinyprop.autograd, "fixed_native_keep", lambda *a: None)
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                stats = [
                    tinyprop.train_step(model, x, y, loss, optimizer, fused_update=fused_update)
                    for x, y in batches
                ]
            finally:
                torch.set_num_threads(before)
        return model, optimizer, stats

    separate, separate_optimizer, separate_stats = train(summed=False)
    assert not calls
    summed, summed_optimizer, summed_stats = train(summed=True)
    assert calls == [1, 3, 10] * 3  # k of every Linear layer, output first, in every step
    for step, expected in zip(summed_stats, separate_stats, strict=True):
        assert step.kernels == expected.kernels
        kernel = tinyprop.autograd.FUSED_UPDATE if fused_update else tinyprop.autograd.NATIVE_SPARSE
        assert step.kernels["0"] == kernel
        assert vars(step.macs) == vars(expected.macs)
        for name, keep in step.keep.items():
            assert torch.equal(keep, expected.keep[name]), name
            assert keep.numel() == batch - len(range(1, batch, 3))  # the zero rows keep nothing
    for (name, value), expected in zip(
        summed.state_dict().items(), separate.state_dict().values(), strict=True
    ):
        assert torch.equal(value, expected), name
    for state, expected in zip(
        summed_optimizer.state.values(), separate_optimizer.state.values(), strict=True
    ):
        assert torch.equal(state["momentum_buffer"], expected["momentum_buffer"])


def test_a_selection_is_kept_only_where_the_bookkeeping_trains_the_same_rows():
    """selection_fits: the rows few_rows trains (Y_l > 0) with k = the selection's, as many
    as the selection kept entries of; not when a Y_l rounds to 0 (fewer rows), another k, or
    no bookkeeping (None: the tensor code decides)."""
    fits = tinyprop.autograd.selection_fits
    errors, maxima = [1.0, 2.0], [1.0, 2.0]
    assert fits(([0, 2], errors, [5, 5], maxima), 5, 10)
    assert not fits(([0], errors[:1], [5], maxima[:1]), 5, 10)  # a Y_l rounded to 0
    assert not fits(([0, 2], errors, [5, 4], maxima), 5, 10)  # another k
    assert not fits(None, 5, 10)
    assert fits(([], [], [], []), 5, 0)  # every row's δ is zero
