"""Human activity recognition: UCI HAR (real format), BasicMotions (real substitute), or synthetic.

Real format (``data_dir``, or ``$TINYPROP_DATA`` holding ``UCI HAR Dataset/``): the extracted
``UCI HAR Dataset``: ``{train,test}/Inertial Signals/<signal>_{train,test}.txt`` (one window of
128 readings at 50 Hz per line, 9 signals) and ``{train,test}/y_{train,test}.txt`` (labels 1..6).
Samples are ``(9, 128)`` in the order body_acc x/y/z, body_gyro x/y/z, total_acc x/y/z; labels
0..5 = walking, upstairs, downstairs, sitting, standing, laying. Source ``"uci har"``.

Offline (no real folder):

- ``substitute="basicmotions"`` (default): real smartwatch data from the ``aeon`` 1.6.0 wheel,
  ``(6, 100)``, 4 classes, 40 train / 40 test; source ``"basicmotions as har substitute"``. It is
  tiny, so ``resplit=SEED`` pools the 80 recordings and draws a seeded stratified split
  (``train_fraction`` of each class to train) for repeated evaluation.
- ``substitute="synthetic"``: labelled synthetic windows with UCI HAR's shape, classes and sizes
  (:mod:`tinyprop.data.synthetic_har`), for timing; source ``"synthetic har-shaped"``.

Example:
    >>> train = load("har", "train")  # doctest: +SKIP
    >>> train.source, train.num_classes, train.input_shape  # doctest: +SKIP
    ('basicmotions as har substitute', 4, (6, 100))
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tinyprop.data import basicmotions, synthetic_har
from tinyprop.data.base import ArrayDataset
from tinyprop.data.npz_cache import cached_arrays
from tinyprop.data.real_data import find_real_root

SIGNALS = (
    "body_acc_x", "body_acc_y", "body_acc_z", "body_gyro_x", "body_gyro_y", "body_gyro_z",
    "total_acc_x", "total_acc_y", "total_acc_z",
)  # fmt: skip
ACTIVITIES = synthetic_har.ACTIVITIES
SOURCE_REAL = "uci har"
SOURCE_BASICMOTIONS = "basicmotions as har substitute"
SOURCE_SYNTHETIC = "synthetic har-shaped"
SUBSTITUTES = ("basicmotions", "synthetic")
EXPECTED = (
    "the extracted 'UCI HAR Dataset': train/Inertial Signals/*_train.txt, train/y_train.txt, "
    "test/Inertial Signals/*_test.txt, test/y_test.txt"
)


def _is_root(folder: Path) -> bool:
    return (folder / "train" / "Inertial Signals").is_dir() or (
        folder / "test" / "Inertial Signals"
    ).is_dir()


def _read_matrix(path: Path, columns: int | None) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: UCI HAR needs it; re-extract 'UCI HAR Dataset.zip' there"
        )
    try:
        matrix = np.loadtxt(path, dtype=np.float32, ndmin=2)
    except ValueError as error:
        raise ValueError(
            f"cannot parse {path} ({error}); the file is corrupt: re-extract 'UCI HAR Dataset.zip'"
        ) from error
    finite = np.isfinite(matrix)  # np.loadtxt reads "nan", "inf" and 1e39 (inf in float32)
    if not finite.all():
        line = int(np.argwhere(~finite)[0, 0]) + 1
        raise ValueError(
            f"{path} holds a NaN or infinite value (line {line}); the file is corrupt: "
            "re-extract 'UCI HAR Dataset.zip'"
        )
    if columns is not None and matrix.shape[1] != columns:
        raise ValueError(
            f"{path} has {matrix.shape[1]} values per line, expected {columns}; the file is "
            "corrupt: re-extract 'UCI HAR Dataset.zip'"
        )
    return matrix


def read_uci_har(root: Path, split: str) -> dict[str, np.ndarray]:
    """Read one split of the real UCI HAR: ``x`` (N, 9, 128) float32, ``y`` (N,) int64 in 0..5."""
    folder = root / split
    signals = [
        _read_matrix(folder / "Inertial Signals" / f"{signal}_{split}.txt", 128)
        for signal in SIGNALS
    ]  # 9 x (N, 128)
    labels = _read_matrix(folder / f"y_{split}.txt", 1)[:, 0]
    counts = {len(s) for s in signals} | {len(labels)}
    if len(counts) != 1:
        raise ValueError(
            f"UCI HAR {split} files in {folder} disagree on the number of windows "
            f"({sorted(counts)}); re-extract 'UCI HAR Dataset.zip'"
        )
    if labels.min() < 1 or labels.max() > 6 or np.any(labels != np.round(labels)):
        raise ValueError(f"{folder / f'y_{split}.txt'} must hold activity labels 1..6")
    x = np.stack(signals, axis=1)  # (N, 9, 128)
    return {"x": x, "y": labels.astype(np.int64) - 1}


def _limit(x: np.ndarray, y: np.ndarray, limit: int | None, seed: int):
    if limit is None:
        return x, y
    if limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    keep = np.random.default_rng([seed, 5]).permutation(len(y))[:limit]
    return x[keep], y[keep]


def load(
    name: str,
    split: str,
    data_dir: str | None = None,
    *,
    substitute: str = "basicmotions",
    resplit: int | None = None,
    train_fraction: float = 0.5,
    size: int | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> ArrayDataset:
    """Load one split of UCI HAR (real folder) or an offline substitute.

    Args:
        name: ``"har"``.
        split: ``"train"`` or ``"test"``.
        data_dir: the ``UCI HAR Dataset`` folder (or its parent); default ``$TINYPROP_DATA``.
        substitute: offline source, ``"basicmotions"`` (real, default) or ``"synthetic"``.
        resplit: BasicMotions only: None for the official 40/40 split, or a seed for a
            stratified re-split of all 80 recordings.
        train_fraction: share of each class in train when re-splitting.
        size: synthetic only: number of windows (default UCI HAR's 7,352 / 2,947).
        limit: keep at most this many samples (a seeded random subset).
        seed: seed of the synthetic data and of the subset.

    Returns:
        An :class:`ArrayDataset`: ``(9, 128)`` x 6 classes (UCI HAR, synthetic) or ``(6, 100)``
        x 4 classes (BasicMotions).

    Example:
        >>> load("har", "test", resplit=1).input_shape  # doctest: +SKIP
        (6, 100)
    """
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'test'")
    if substitute not in SUBSTITUTES:
        raise ValueError(f"unknown substitute {substitute!r}; choose one of {SUBSTITUTES}")
    root = find_real_root(
        name, data_dir, _is_root, ["UCI HAR Dataset", "UCI_HAR_Dataset"], EXPECTED
    )
    if root is not None:
        label_file = root / split / f"y_{split}.txt"
        stamp = label_file.stat().st_mtime if label_file.is_file() else None
        parameters = {"root": str(root.resolve()), "split": split, "stamp": stamp, "format": 1}
        arrays = cached_arrays("har", f"uci-{split}", parameters, lambda: read_uci_har(root, split))
        x, y, source, classes = arrays["x"], arrays["y"], SOURCE_REAL, len(ACTIVITIES)
    elif substitute == "synthetic":
        x, y = synthetic_har.generate(split, size, seed)
        source, classes = SOURCE_SYNTHETIC, len(ACTIVITIES)
    else:
        if resplit is None:
            x, y, names = basicmotions.load_arrays(split)
        else:
            x_train, y_train, names = basicmotions.load_arrays("train")
            x_test, y_test, _ = basicmotions.load_arrays("test")
            pool_x, pool_y = np.concatenate([x_train, x_test]), np.concatenate([y_train, y_test])
            parts = basicmotions.stratified_resplit(pool_x, pool_y, train_fraction, resplit)
            x, y = parts[0] if split == "train" else parts[1]
        source, classes = SOURCE_BASICMOTIONS, len(names)
    x, y = _limit(x, y, limit, seed)
    return ArrayDataset(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y), source,
                        classes)  # fmt: skip
