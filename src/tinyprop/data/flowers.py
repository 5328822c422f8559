"""Oxford Flowers102: the official ``jpg/`` + ``imagelabels.mat`` + ``setid.mat`` under
``data_dir``, else a synthetic 102-class colour-image stand-in."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tinyprop.data.base import ArrayDataset
from tinyprop.data.image_folders import load_image_dataset
from tinyprop.data.synthetic_images import FLOWERS

SOURCE_STAND_IN = "synthetic flowers102 stand-in"
NUM_CLASSES = 102


def _is_official(folder: Path) -> bool:
    return (folder / "imagelabels.mat").is_file() and (folder / "setid.mat").is_file()


def find_official(folder: Path) -> Path | None:
    """The folder holding ``jpg/``, ``imagelabels.mat`` and ``setid.mat`` under ``folder``."""
    for name in ("flowers-102", "flowers102", "Flowers102", "flowers"):
        if _is_official(folder / name):
            return folder / name
    return folder if _is_official(folder) else None


def _read_mat(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Named integer vectors from a MATLAB file, with a clear error if unreadable."""
    from tinyprop.extras import require

    require("scipy", "bench")  # MATLAB files need scipy.io
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    try:
        mat = loadmat(path)
        return {key: np.asarray(mat[key]).astype(np.int64).ravel() for key in keys}
    except KeyError as error:
        raise ValueError(f"{path} lacks the variable {error}: re-download the file") from error
    except (MatReadError, ValueError, OSError, TypeError) as error:
        raise ValueError(f"cannot read {path} ({error}): re-download the file") from error


def official_split(folder: Path, split: str) -> tuple[list[Path], np.ndarray]:
    """Image paths and 0-based labels of one split of the official release.

    As is common practice (e.g. torchvision), ``train`` is ``trnid`` + ``valid`` (2,040 images,
    20 per class) and ``test`` is ``tstid`` (6,149 images); ``imagelabels.mat`` labels 1..102
    become 0..101. Image ``i`` is ``jpg/image_{i:05d}.jpg``.

    Args:
        folder: holds ``jpg/``, ``imagelabels.mat`` and ``setid.mat``.
        split: ``"train"`` or ``"test"``.

    Returns:
        ``(paths, labels)``.

    Example:
        >>> paths, labels = official_split(Path("flowers-102"), "test")  # doctest: +SKIP
    """
    labels = _read_mat(folder / "imagelabels.mat", ("labels",))["labels"]  # (8189,) 1..102
    ids = _read_mat(folder / "setid.mat", ("trnid", "valid", "tstid"))
    chosen = np.concatenate([ids["trnid"], ids["valid"]]) if split == "train" else ids["tstid"]
    if chosen.size and (chosen.min() < 1 or chosen.max() > labels.size):
        raise ValueError(
            f"setid.mat in {folder} names image ids outside 1..{labels.size} of imagelabels.mat: "
            "the two files do not belong together; re-download them"
        )
    targets = labels[chosen - 1] - 1  # (n,) 0-based
    if targets.size and (targets.min() < 0 or targets.max() >= NUM_CLASSES):
        raise ValueError(f"imagelabels.mat in {folder} has labels outside 1..{NUM_CLASSES}")
    paths = [folder / "jpg" / f"image_{int(i):05d}.jpg" for i in chosen]
    return paths, targets


def load(
    name: str = "flowers102", split: str = "train", data_dir: str | Path | None = None, **options
) -> ArrayDataset:
    """Load Flowers102 as float32 ``(N, 3, R, R)``, normalised per channel.

    With ``data_dir`` (or ``$TINYPROP_DATA``) holding the official release (in ``flowers-102/``,
    ``flowers102/`` or the folder itself), images are decoded with Pillow, the shorter side
    resized to R, the centre cropped (cached), and normalised with the ImageNet mean/std;
    train = ``trnid`` + ``valid``, test = ``tstid`` (see :func:`official_split`). Otherwise the
    synthetic stand-in is used: 102 classes, 40 train / 10 test images per class by default,
    normalised with its own mean/std.

    Args:
        name: ``"flowers102"``.
        split: ``"train"`` or ``"test"``.
        data_dir: folder with the official files; an explicit folder without them is an error.
        options: ``resolution`` (R, default 64), ``limit`` (keep the first n samples); for the
            stand-in also ``per_class`` and ``seed`` (default 0); ignored for real data.

    Returns:
        An :class:`ArrayDataset` with ``source`` ``"flowers102"`` or
        ``"synthetic flowers102 stand-in"``.

    Example:
        >>> test = load("flowers102", "test", resolution=32)
        >>> test.input_shape
        (3, 32, 32)
    """
    return load_image_dataset(
        "flowers102",
        split,
        data_dir,
        options,
        find_official=find_official,
        official_split=official_split,
        release="Flowers102 release (jpg/, imagelabels.mat, setid.mat) in {folder} or "
        "{folder}/flowers-102",
        stand_in=FLOWERS,
        stand_in_source=SOURCE_STAND_IN,
        num_classes=NUM_CLASSES,
    )
