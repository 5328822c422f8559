"""The training loop of a benchmark run: dense pretraining, on-device training with a policy
through ``tinyprop.train_step``, and evaluation."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional

import tinyprop
from tinyprop.bench import metrics
from tinyprop.models import reconstruction_loss


def per_sample_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each sample, ``(B,)``."""
    return functional.cross_entropy(logits, labels, reduction="none")


def loss_function(autoencoder: bool):
    """The per-sample loss: reconstruction MSE for an autoencoder, else cross-entropy."""
    return reconstruction_loss if autoencoder else per_sample_cross_entropy


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
) -> nn.Module:
    """Plain PyTorch training (dense, Adam, mean loss): the ``finetune`` protocol's pretraining.

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
) -> TrainResult:
    """Train with ``tinyprop.train_step`` under ``config`` (Adam), then remove tinyprop.

    Args:
        model: a plain model; tinyprop is applied for the run and removed afterwards.
        config: the policy and its settings.
        x: ``(N, *input_shape)`` training inputs.
        y: ``(N,)`` labels (ignored for an autoencoder, whose target is ``x``).
        epochs: passes over ``x``.
        batch_size: samples per optimizer step.
        lr: Adam learning rate.
        seed: seeds the batch order.
        autoencoder: reconstruction loss instead of cross-entropy.
        progress: optional callable ``progress(samples_done)`` called after every batch.

    Returns:
        A :class:`TrainResult` with the accumulated ledger and skip counts.
    """
    loss_fn = loss_function(autoencoder)
    tinyprop.apply(model, config)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
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
