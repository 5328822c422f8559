"""Test-only tiny datasets, generated in memory in milliseconds (no files, no network).

``tiny-blobs``: 4 Gaussian classes in 16 dimensions, shaped ``(1, 4, 4)``, for the MNIST MLP.
``tiny-anomaly``: normal vs anomalous 16-dimensional vectors for the autoencoder (AUC); the
training split holds normal samples only, as in DCASE.
"""

from __future__ import annotations

import torch

from tinyprop.data.base import ArrayDataset

# tiny dataset -> (reference-model dataset whose builder it uses, default samples per split)
TINY_DATASETS = {"tiny-blobs": "mnist", "tiny-anomaly": "dcase2020"}
_SIZES = {"train": 240, "test": 120}


def load(name: str, split: str, samples: int | None = None) -> ArrayDataset:
    """Generate one split of a tiny dataset (seeded by name and split).

    Example:
        >>> load("tiny-blobs", "train").input_shape
        (1, 4, 4)
    """
    if name not in TINY_DATASETS:
        raise ValueError(f"unknown tiny dataset {name!r}; choose one of {list(TINY_DATASETS)}")
    if split not in _SIZES:
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'test'")
    count = samples or _SIZES[split]
    seed = 1 + list(TINY_DATASETS).index(name)
    centres = 1.5 * torch.randn(4, 16, generator=torch.Generator().manual_seed(seed))  # (4, 16)
    generator = torch.Generator().manual_seed(100 * seed + list(_SIZES).index(split))
    if name == "tiny-blobs":
        labels = torch.arange(count) % 4  # (N,)
        x = centres[labels] + torch.randn(count, 16, generator=generator)  # (N, 16)
        return ArrayDataset(x.reshape(count, 1, 4, 4), labels, "synthetic tiny blobs (test)", 4)
    labels = torch.zeros(count, dtype=torch.int64)
    if split == "test":
        labels[count // 2 :] = 1
    basis = centres[:2]  # (2, 16): normal data lies near a 2-D plane
    x = torch.randn(count, 2, generator=generator) @ basis  # (N, 16)
    x = x + 0.1 * torch.randn(count, 16, generator=generator)
    x[labels == 1] += 1.5 * torch.randn(int(labels.sum()), 16, generator=generator)
    return ArrayDataset(x, labels, "synthetic tiny anomalies (test)", 2)
