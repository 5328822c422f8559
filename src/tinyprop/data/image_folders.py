"""The shared loader of the image-classification datasets read from folders of JPEGs
(Flowers102, Food-101): the official release when present, else a synthetic stand-in."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from tinyprop.data.base import ArrayDataset, resolve_data_dir
from tinyprop.data.images import IMAGENET_MEAN, IMAGENET_STD, load_image_files, normalise
from tinyprop.data.synthetic_images import synthetic_dataset

DEFAULT_RESOLUTION = 64


def load_image_dataset(
    name: str,
    split: str,
    data_dir: str | Path | None,
    options: dict,
    *,
    find_official: Callable[[Path], Path | None],
    official_split: Callable[[Path, str], tuple[list[Path], np.ndarray]],
    release: str,
    stand_in,
    stand_in_source: str,
    num_classes: int,
) -> ArrayDataset:
    """Load one split as float32 ``(N, 3, R, R)``.

    Args:
        name: the dataset's name (its ``source`` when real).
        split: ``"train"`` or ``"test"``.
        data_dir: folder with the official release; an explicit folder without it is an error.
        options: ``resolution`` (R, default 64), ``limit``; for the stand-in also ``per_class``
            and ``seed``.
        find_official: where the release lies under a folder, or None.
        official_split: the release's image paths and labels of a split.
        release: what the release holds, for the error when it is missing, e.g.
            ``"Flowers102 release (jpg/, ...)"``; ``folder`` is the release's usual subfolder.
        stand_in: the synthetic generator's class specification.
        stand_in_source: the ``source`` of the stand-in.
        num_classes: number of classes.
    """
    resolution = int(options.pop("resolution", DEFAULT_RESOLUTION))
    limit = options.pop("limit", None)
    per_class, seed = options.pop("per_class", None), int(options.pop("seed", 0))
    if options:
        raise TypeError(f"unknown {name} option(s) {sorted(options)}; see the loader's docstring")
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'test'")
    folder, explicit = resolve_data_dir(data_dir)
    official = find_official(folder) if folder is not None else None
    if official is not None:
        paths, labels = official_split(official, split)
        paths, labels = paths[:limit], labels[:limit]
        images = load_image_files(f"{name}-real", paths, resolution, f"{name} {split}")
        x = normalise(images, IMAGENET_MEAN, IMAGENET_STD)  # (N, 3, R, R)
        return ArrayDataset(x, labels, source=name, num_classes=num_classes)
    if explicit:
        raise FileNotFoundError(
            f"no {release.format(folder=folder)}: put it there, or leave data_dir unset for the "
            "stand-in"
        )
    return synthetic_dataset(stand_in, split, stand_in_source, resolution, per_class, seed, limit)
