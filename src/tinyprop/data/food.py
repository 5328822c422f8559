"""Food-101: the official ``images/<class>/<id>.jpg`` + ``meta/{classes,train,test}.txt`` under
``data_dir``, else a synthetic 101-class colour-image stand-in."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tinyprop.data.base import ArrayDataset
from tinyprop.data.image_folders import load_image_dataset
from tinyprop.data.synthetic_images import FOOD

SOURCE_STAND_IN = "synthetic food101 stand-in"
NUM_CLASSES = 101


def _is_official(folder: Path) -> bool:
    return (folder / "meta" / "classes.txt").is_file() and (folder / "images").is_dir()


def find_official(folder: Path) -> Path | None:
    """The folder holding ``images/`` and ``meta/`` under ``folder`` (or ``folder`` itself)."""
    for name in ("food-101", "food101", "Food101"):
        if _is_official(folder / name):
            return folder / name
    return folder if _is_official(folder) else None


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: unpack the complete Food-101 archive")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def official_split(folder: Path, split: str) -> tuple[list[Path], np.ndarray]:
    """Image paths and labels of one split of the official release.

    ``meta/classes.txt`` lists the class names (label = line number from 0); ``meta/train.txt``
    and ``meta/test.txt`` list ``<class>/<id>`` (750 / 250 per class); image
    ``images/<class>/<id>.jpg``.

    Args:
        folder: holds ``images/`` and ``meta/``.
        split: ``"train"`` or ``"test"``.

    Returns:
        ``(paths, labels)``.

    Example:
        >>> paths, labels = official_split(Path("food-101"), "test")  # doctest: +SKIP
    """
    classes = _read_lines(folder / "meta" / "classes.txt")
    if len(classes) != NUM_CLASSES or len(set(classes)) != NUM_CLASSES:
        raise ValueError(
            f"{folder}/meta/classes.txt lists {len(classes)} names ({len(set(classes))} "
            f"distinct), expected {NUM_CLASSES}: re-download the archive"
        )
    index = {name: label for label, name in enumerate(classes)}
    paths, labels = [], []
    for line in _read_lines(folder / "meta" / f"{split}.txt"):
        class_name = line.split("/", 1)[0]
        if class_name not in index or "/" not in line:
            raise ValueError(
                f"{folder}/meta/{split}.txt has the entry {line!r}, whose class is not in "
                "meta/classes.txt: re-download the archive"
            )
        paths.append(folder / "images" / f"{line}.jpg")
        labels.append(index[class_name])
    return paths, np.asarray(labels, dtype=np.int64)


def load(
    name: str = "food101", split: str = "train", data_dir: str | Path | None = None, **options
) -> ArrayDataset:
    """Load Food-101 as float32 ``(N, 3, R, R)``, normalised per channel.

    With ``data_dir`` (or ``$TINYPROP_DATA``) holding the official release (in ``food-101/``,
    ``food101/`` or the folder itself), the official train/test lists are used; images are
    decoded with Pillow, shorter side resized to R, centre cropped (cached), and normalised
    with the ImageNet mean/std. Otherwise the synthetic stand-in: 101 classes, 30 train / 10
    test images per class by default (1/25 of the real 750 / 250), normalised with its own
    mean/std.

    Args:
        name: ``"food101"``.
        split: ``"train"`` or ``"test"``.
        data_dir: folder with the official files; an explicit folder without them is an error.
        options: ``resolution`` (R, default 64), ``limit`` (keep the first n samples); for the
            stand-in also ``per_class`` and ``seed`` (default 0); ignored for real data.

    Returns:
        An :class:`ArrayDataset` with ``source`` ``"food101"`` or ``"synthetic food101 stand-in"``.

    Example:
        >>> test = load("food101", "test", resolution=32)
        >>> test.num_classes
        101
    """
    return load_image_dataset(
        "food101",
        split,
        data_dir,
        options,
        find_official=find_official,
        official_split=official_split,
        release="Food-101 release (images/, meta/classes.txt, meta/{{train,test}}.txt) in "
        "{folder} or {folder}/food-101",
        stand_in=FOOD,
        stand_in_source=SOURCE_STAND_IN,
        num_classes=NUM_CLASSES,
    )
