"""Test metrics: classification accuracy and the anomaly-detection AUC (by ranks, no sklearn)."""

from __future__ import annotations

import torch


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Percent of samples whose largest logit is the label.

    Example:
        >>> accuracy(torch.tensor([[2.0, 1.0], [0.0, 3.0]]), torch.tensor([0, 0]))
        50.0
    """
    if logits.shape[0] != labels.shape[0] or labels.numel() == 0:
        raise ValueError(f"need one label per row of logits, got {logits.shape} and {labels.shape}")
    return 100.0 * (logits.argmax(dim=1) == labels).float().mean().item()


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve in percent: the probability that a random positive (label 1)
    scores higher than a random negative (label 0), ties counting one half.

    Computed from ranks (Mann-Whitney U) with tied scores given their average rank.

    Args:
        scores: ``(N,)`` anomaly scores (higher = more anomalous).
        labels: ``(N,)`` 0 (normal) or 1 (anomalous); both must occur.

    Returns:
        AUC in percent (50 = chance, 100 = perfect).

    Example:
        >>> auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]))
        75.0
    """
    scores = scores.detach().double().flatten()  # (N,)
    labels = labels.flatten()
    if scores.shape != labels.shape:
        raise ValueError(f"need one label per score, got {scores.shape} and {labels.shape}")
    positives = int((labels == 1).sum())
    negatives = int((labels == 0).sum())
    if positives == 0 or negatives == 0 or positives + negatives != labels.numel():
        raise ValueError(
            "AUC needs labels that are 0 (normal) or 1 (anomalous) with both present; got "
            f"{positives} positives and {negatives} negatives of {labels.numel()}"
        )
    order = torch.argsort(scores)
    sorted_scores = scores[order]
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, scores.numel() + 1, dtype=torch.float64)
    # average the ranks of tied scores
    unique, inverse, counts = torch.unique_consecutive(
        sorted_scores, return_inverse=True, return_counts=True
    )
    ends = torch.cumsum(counts, 0).double()  # (U,) last rank of each tie group
    average = ends - (counts.double() - 1) / 2
    ranks[order] = average[inverse]
    rank_sum = ranks[labels == 1].sum().item()
    u_statistic = rank_sum - positives * (positives + 1) / 2
    return 100.0 * u_statistic / (positives * negatives)
