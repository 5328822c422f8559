"""Fashion-MNIST as itself (10 classes of 28x28 clothing images): the official IDX files under
``data_dir``, else the Debian package ``dataset-fashion-mnist`` (the cifar10 stand-in's source,
see :mod:`tinyprop.data.cifar`), the same 60,000 / 10,000 images."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tinyprop.data.base import ArrayDataset, resolve_data_dir
from tinyprop.data.cifar import fashion_mnist_arrays
from tinyprop.data.idx import IDX_STEMS, find_idx, read_idx_split
from tinyprop.data.images import FASHION_MNIST_MEAN, FASHION_MNIST_STD, normalise

SUBFOLDERS = ("fashion-mnist", "fashion_mnist", "FashionMNIST/raw", "FashionMNIST")


def find_official(folder: Path, explicit: bool) -> Path | None:
    """The folder holding the official IDX files: a subfolder of ``folder`` named as in
    :data:`SUBFOLDERS`, or (when the user named it) ``folder`` itself. (MNIST's files have
    the same names, so a shared data folder must keep them apart.)"""
    candidates = [folder / name for name in SUBFOLDERS] + ([folder] if explicit else [])
    for candidate in candidates:
        if find_idx(candidate, "train", "images") is not None:
            return candidate
    return None


def load(
    name: str = "fashion_mnist", split: str = "train", data_dir: str | Path | None = None,
    **options,
) -> ArrayDataset:  # fmt: skip
    """Load a Fashion-MNIST split as float32 ``(N, 1, 28, 28)`` normalised by its mean 0.2860
    and std 0.3530.

    Args:
        name: ``"fashion_mnist"``.
        split: ``"train"`` or ``"test"``.
        data_dir: folder with the four official IDX files (plain or ``.gz``), directly or in
            ``fashion-mnist/``; an explicit folder without them is an error.
        options: ``limit`` (int): keep the first ``limit`` samples.

    Returns:
        An :class:`ArrayDataset` with ``source`` ``"fashion-mnist"``, 10 classes.

    Example:
        >>> load("fashion_mnist", "test", limit=10).input_shape  # doctest: +SKIP
        (1, 28, 28)
    """
    limit = options.pop("limit", None)
    if options:
        raise TypeError(f"unknown fashion_mnist option(s) {sorted(options)}; the only is limit")
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'test'")
    folder, explicit = resolve_data_dir(data_dir)
    official = find_official(folder, explicit) if folder is not None else None
    if official is not None:
        images, labels = read_idx_split(official, split)
    elif explicit:
        raise FileNotFoundError(
            f"no Fashion-MNIST IDX files ({IDX_STEMS[('train', 'images')]}[.gz], ...) in "
            f"{folder} or {folder}/fashion-mnist: put them there, or leave data_dir unset to "
            "use the Debian package's copy"
        )
    else:
        images, labels = fashion_mnist_arrays(split)
    images, labels = images[:limit], labels[:limit]
    x = normalise(images[:, None], FASHION_MNIST_MEAN, FASHION_MNIST_STD)  # (N, 1, 28, 28)
    return ArrayDataset(x, labels.astype(np.int64), source="fashion-mnist", num_classes=10)
