"""δ_L from the skip decision's own loss gradient (tinyprop.loss_gradient): the step's output
error without a second backward through the loss, bit for bit."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from test_few_rows_conv import DATASET_FILES, finetune_run
from test_lean_steps import assert_same_bits, train
from torch import nn

import tinyprop
from tinyprop import graph_free, loss_gradient, step
from tinyprop.data import cache_dir
from tinyprop.loss_gradient import (
    is_row_cross_entropy,
    output_error,
    row_cross_entropy_gradient,
)


@pytest.fixture(autouse=True)
def autograd_path(monkeypatch):
    """These steps run the autograd path, whose output node (OutputBoundary) is under test
    (the graph-free step of a plain nn.Sequential takes δ_L the same way:
    tests/test_graph_free.py)."""
    monkeypatch.setattr(graph_free, "eligible", lambda *arguments: False)


def test_output_error_is_the_weighted_loss_backward_bit_for_bit():
    """w_n · ∂ Σ losses / ∂ output against ∂ Σ w_n · loss_n / ∂ output: the same bits for
    every trained row and a power-of-two 1 / B (confident rows, p_y = 1, included); zeros of
    either sign for the skipped rows."""
    generator = torch.Generator().manual_seed(0)
    for trial in range(300):
        batch, classes = [(8, 4), (32, 10), (5, 3), (64, 1000)][trial % 4]
        scale = [1.0, 10.0, 100.0][trial % 3]  # 100: p_y rounds to 1 in some rows
        output = (torch.randn(batch, classes, generator=generator) * scale).requires_grad_()
        labels = torch.randint(0, classes, (batch,), generator=generator)
        losses = F.cross_entropy(output, labels, reduction="none")
        (gradient,) = torch.autograd.grad(losses.sum(), output, retain_graph=True)
        mask = torch.rand(batch, generator=generator) < 0.5
        averaged = [batch, 8, 16, 1][trial % 4] if trial % 4 != 2 else 8
        weights = mask.float() / averaged
        (expected,) = torch.autograd.grad((losses * weights).sum(), output)
        delta = output_error(gradient, mask, averaged)
        assert torch.equal(delta[mask].view(torch.int32), expected[mask].view(torch.int32))
        assert torch.equal(delta, expected)  # skipped rows: zeros (of either sign)


def test_the_decision_gradient_without_a_backward_is_autograds_bit_for_bit():
    """The skip decision's ∂ Σ losses / ∂ output from the NLL and log-softmax kernels on the
    nodes' saved tensors, against torch.autograd.grad: the same bits, confident rows and
    ignored targets (the default -100 and another ignore_index) included."""
    generator = torch.Generator().manual_seed(1)
    for trial in range(200):
        batch, classes = [(8, 4), (32, 10), (5, 3), (64, 1000)][trial % 4]
        scale = [1.0, 10.0, 100.0][trial % 3]
        leaf = (torch.randn(batch, classes, generator=generator) * scale).requires_grad_()
        output = leaf.clone()  # (B, C) not a leaf, as a model's output
        labels = torch.randint(0, classes, (batch,), generator=generator)
        ignore = [-100, 2][trial % 2]
        labels[torch.rand(batch, generator=generator) < 0.2] = ignore
        losses = F.cross_entropy(output, labels, reduction="none", ignore_index=ignore)
        assert is_row_cross_entropy(losses, output)
        (expected,) = torch.autograd.grad(losses.sum(), output, retain_graph=True)
        got = row_cross_entropy_gradient(losses)
        assert torch.equal(got.view(torch.int32), expected.view(torch.int32))
        assert not got.requires_grad  # no graph of its own


def test_a_scale_that_is_not_a_power_of_two_would_round_differently():
    """Why the step takes the decision's gradient only for a power-of-two 1 / B: with 1 / 3,
    w · (p - 1) and -w + p · w round differently somewhere."""
    generator = torch.Generator().manual_seed(0)
    output = torch.randn(512, 10, generator=generator).requires_grad_()
    losses = F.cross_entropy(
        output, torch.randint(0, 10, (512,), generator=generator), reduction="none"
    )
    (gradient,) = torch.autograd.grad(losses.sum(), output, retain_graph=True)
    mask = torch.ones(512, dtype=torch.bool)
    (expected,) = torch.autograd.grad((losses * (mask.float() / 3)).sum(), output)
    assert not torch.equal(output_error(gradient, mask, 3), expected)


def test_the_cross_entropy_of_rows_is_found_in_the_graph():
    output = nn.Linear(6, 4)(torch.randn(8, 6))
    labels = torch.randint(0, 4, (8,))
    assert is_row_cross_entropy(F.cross_entropy(output, labels, reduction="none"), output)
    assert is_row_cross_entropy(nn.CrossEntropyLoss(reduction="none")(output, labels), output)
    assert is_row_cross_entropy(F.nll_loss(output.log_softmax(1), labels, reduction="none"), output)
    others = [
        F.cross_entropy(output, labels, reduction="none", weight=torch.rand(4)),
        F.cross_entropy(output, labels, reduction="none", label_smoothing=0.1),
        F.cross_entropy(output * 2, labels, reduction="none"),  # not of the output itself
        F.cross_entropy(output, labels, reduction="none") * 2,
        ((output - 1) ** 2).mean(1),
        F.nll_loss(output.log_softmax(0), labels, reduction="none"),  # across the samples
    ]
    for losses in others:
        assert not is_row_cross_entropy(losses, output)
    wide = output.double()
    assert not is_row_cross_entropy(F.cross_entropy(wide, labels, reduction="none"), wide)
    sequence = torch.randn(8, 4, 5, requires_grad=True) * 1  # (B, C, T): not one row each
    losses = F.cross_entropy(sequence, torch.randint(0, 4, (8, 5)), reduction="none").mean(1)
    assert not is_row_cross_entropy(losses, sequence)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "model_name, settings",
    [("mlp", {}), ("conv1d", {}), ("normed", {}), ("mlp", {"mean_over_trained": True})],
)
def test_training_is_bit_identical_with_the_decisions_gradient(
    model_name, settings, threads, monkeypatch
):
    """Steps of 8 samples (1 / 8: the decision's gradient) and of 5 (the loss's backward), with
    BatchNorm, over the trained samples: the same steps, k, weights, ledger and state."""
    taken = []
    backward = loss_gradient.OutputBoundary.backward
    monkeypatch.setattr(
        loss_gradient.OutputBoundary,
        "backward",
        staticmethod(lambda ctx, grad: taken.append(1) or backward(ctx, grad)),
    )
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fast = train(model_name, "adam", None, **settings)
        assert taken  # the path under test ran
        monkeypatch.setattr(step, "is_row_cross_entropy", lambda *arguments: False)
        reference = train(model_name, "adam", None, **settings)
    finally:
        torch.set_num_threads(before)
    assert_same_bits(fast, reference)
    trained = [stats[1] for stats in reference[0]]
    assert len(taken) < sum(1 for count in trained if count)  # batches of 5: the loss's


def test_the_har_finetune_run_is_bit_identical_with_the_decisions_gradient(monkeypatch):
    """The bench's har finetune run (batches of 8 and 2): every step's samples and k, and the
    final weights, bit for bit."""
    if not any(cache_dir().glob(DATASET_FILES["har"])):
        pytest.skip("the har data is not in the cache (tinyprop bench downloads it)")
    taken = []
    backward = loss_gradient.OutputBoundary.backward
    monkeypatch.setattr(
        loss_gradient.OutputBoundary,
        "backward",
        staticmethod(lambda ctx, grad: taken.append(1) or backward(ctx, grad)),
    )
    fast = finetune_run("har")
    assert taken
    monkeypatch.setattr(step, "is_row_cross_entropy", lambda *arguments: False)
    assert_same_bits(fast, finetune_run("har"))


def test_the_decision_gradient_is_no_graph_and_a_coupled_step_warns_nothing():
    """∂ Σ losses / ∂ output from the saved tensors was computed with gradients on: a tensor
    that required grad (an autograd graph kept with the step), read with float() where the
    step checks whether the losses couple the samples (a BatchNorm model whose samples are
    skipped), so PyTorch warned "Converting a tensor with requires_grad=True to a scalar"
    in the user's loop."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))
    tinyprop.apply(model, tinyprop.TinyPropConfig(policy="tinypropv2", budget=0.2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 6, generator=generator), torch.randint(0, 4, (16,), generator=generator)
    losses = loss_fn(model(x), y)
    assert not row_cross_entropy_gradient(losses).requires_grad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support")
        stats = tinyprop.train_step(model, x, y, loss_fn, optimizer)
    assert 0 < stats.skipped < 16  # the check of a coupled loss ran
