"""The training loop of a benchmark run: dense pretraining, on-device training with a policy
through ``tinyprop.train_step``, and evaluation.

Models with BatchNorm get their running statistics recomputed after every training run (one
forward pass over that run's training data, no gradients; see :func:`recalibrate_batchnorm`).
Without it the sparse policies lose most of their accuracy on ResNet-8: sparse weight gradients
are not orthogonal to the directions that BatchNorm normalises away, so the conv weights drift
along them quickly and the running statistics (momentum 0.1) lag behind the weights; the test
pass (eval mode) then normalises with stale statistics (cifar10 stand-in, finetune: tinyprop
35% -> 78%, full 69% -> 78%; ``benchmarks/results/accuracy_study.md``). The forward MACs of
the recalibration pass are added to the run's ledger.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional

import tinyprop
from tinyprop.bench import metrics
from tinyprop.models import reconstruction_loss
from tinyprop.optim import make_optimizer


def per_sample_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each sample, ``(B,)``."""
    return functional.cross_entropy(logits, labels, reduction="none")


def loss_function(autoencoder: bool):
    """The per-sample loss: reconstruction MSE for an autoencoder, else cross-entropy."""
    return reconstruction_loss if autoencoder else per_sample_cross_entropy


def batchnorm_modules(model: nn.Module) -> list[nn.Module]:
    """The BatchNorm modules of ``model`` (1d, 2d, 3d)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, x: torch.Tensor, batch_size: int = 100) -> int:
    """Recompute the running mean and variance of every BatchNorm of ``model`` on ``x``.

    The statistics become the average over the batches of ``x`` (cumulative, not a moving
    average); the weights do not change. The model is left in train mode. A model without
    BatchNorm is left untouched.

    Args:
        model: any model.
        x: ``(N, *input_shape)`` inputs (the training data of the run just done).
        batch_size: samples per forward pass.

    Returns:
        The number of samples passed forward (0 when the model has no BatchNorm).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
        >>> recalibrate_batchnorm(net, torch.randn(10, 2))
        10
    """
    norms = batchnorm_modules(model)
    if not norms or len(x) == 0:
        return 0
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the batches
    model.train()
    try:
        for start in range(0, len(x), batch_size):
            model(x[start : start + batch_size])
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
    return len(x)


@dataclass
class TrainResult:
    """What a training run did: its compute ledger and per-sample skip counts."""

    ledger: tinyprop.Ledger
    trained: int
    skipped: int
    steps: int
    last_loss: float
    wall_s: float

    @property
    def skip_rate(self) -> float:
        """Share of the samples seen whose backward pass was skipped."""
        total = self.trained + self.skipped
        return self.skipped / total if total else 0.0


def batches(count: int, batch_size: int, epochs: int, seed: int):
    """Yield ``(epoch, indices)`` of shuffled minibatches, the same for every policy."""
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        order = torch.randperm(count, generator=generator)
        for start in range(0, count, batch_size):
            yield epoch, order[start : start + batch_size]


def pretrain_dense(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    autoencoder: bool,
    recalibrate: bool = True,
) -> nn.Module:
    """Plain PyTorch training (dense, Adam, mean loss): the ``finetune`` protocol's pretraining.

    With ``recalibrate`` (default), BatchNorm statistics are recomputed on ``x`` at the end.

    Returns:
        The trained model (the same object).
    """
    loss_fn = loss_function(autoencoder)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _, index in batches(len(x), batch_size, epochs, seed):
        inputs = x[index]
        loss = loss_fn(model(inputs), inputs if autoencoder else y[index]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if recalibrate:
        recalibrate_batchnorm(model, x)
    return model


def train_policy(
    model: nn.Module,
    config: tinyprop.TinyPropConfig,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    autoencoder: bool,
    progress=None,
    recalibrate: bool = True,
    optimizer: str = "adam",
) -> TrainResult:
    """Train with ``tinyprop.train_step`` under ``config``, then remove tinyprop and
    recompute the BatchNorm statistics on ``x`` (when the model has BatchNorm).

    Args:
        model: a plain model; tinyprop is applied for the run and removed afterwards.
        config: the policy and its settings.
        x: ``(N, *input_shape)`` training inputs.
        y: ``(N,)`` labels (ignored for an autoencoder, whose target is ``x``).
        epochs: passes over ``x``.
        batch_size: samples per optimizer step.
        lr: learning rate.
        seed: seeds the batch order.
        autoencoder: reconstruction loss instead of cross-entropy.
        progress: optional callable ``progress(samples_done)`` called after every batch.
        recalibrate: recompute BatchNorm running statistics on ``x`` after training (its
            forward MACs are added to the ledger's ``forward``).
        optimizer: ``adam`` (default), ``sgd`` (momentum 0.9) or ``lazy_adam``
            (:class:`tinyprop.optim.LazyAdam`).

    Returns:
        A :class:`TrainResult` with the accumulated ledger and skip counts.
    """
    loss_fn = loss_function(autoencoder)
    tinyprop.apply(model, config)
    optimizer = make_optimizer(optimizer, model, lr)
    ledger = tinyprop.Ledger()
    trained = skipped = steps = 0
    last_loss = float("nan")
    start = time.perf_counter()
    model.train()
    try:
        for _, index in batches(len(x), batch_size, epochs, seed):
            inputs = x[index]
            stats = tinyprop.train_step(
                model, inputs, inputs if autoencoder else y[index], loss_fn, optimizer
            )
            ledger += stats.macs
            trained += int(stats.trained)
            skipped += int(stats.skipped)
            steps += 1
            last_loss = float(stats.loss)
            if progress is not None:
                progress(len(index))
    finally:
        tinyprop.remove(model)
    if recalibrate and (seen := recalibrate_batchnorm(model, x)) and trained + skipped:
        ledger.forward += ledger.forward * seen // (trained + skipped)  # same MACs per sample
    return TrainResult(ledger, trained, skipped, steps, last_loss, time.perf_counter() - start)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Model outputs for ``x`` in eval mode, batch by batch."""
    model.eval()
    outputs = [model(x[start : start + batch_size]) for start in range(0, len(x), batch_size)]
    return torch.cat(outputs)


def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, autoencoder: bool
) -> tuple[str, float]:
    """The metric of ``model`` on ``(x, y)``, as ``(name, value)``.

    Classification: ``("accuracy", percent)``. Autoencoder: ``("auc", percent)`` of the
    reconstruction error as anomaly score when ``y`` holds both normal (0) and anomalous (1)
    samples; a split of normal samples only (a validation split carved from DCASE's normal-only
    training data) gives ``("neg_mse", -mean reconstruction error)``, higher is better.

    Example:
        >>> net = nn.Linear(2, 3)
        >>> evaluate(net, torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), False)[0]
        'accuracy'
    """
    outputs = predict(model, x)
    if not autoencoder:
        return "accuracy", metrics.accuracy(outputs, y)
    scores = reconstruction_loss(outputs, x)  # (N,)
    if bool((y == 0).any()) and bool((y == 1).any()):
        return "auc", metrics.auc(scores, y)
    return "neg_mse", -scores.mean().item()
