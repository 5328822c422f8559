"""Dataset registry: the paper's eight datasets, each from its real format or an offline source,
and two more real ones (Fashion-MNIST as itself, the 8x8 digits).

Example:
    >>> from tinyprop import data
    >>> train = data.load("mnist", "train")
    >>> x, y = train[0]; train.source, train.num_classes, train.input_shape
"""

from __future__ import annotations

import importlib

from tinyprop.data.cache import cache_dir

# name -> module under tinyprop.data that defines `load(split, data_dir=None, **options)`
_REGISTRY: dict[str, str] = {
    "mnist": "mnist",
    "cifar10": "cifar",
    "cifar100": "cifar",
    "flowers102": "flowers",
    "food101": "food",
    "speech_commands": "speech_commands",
    "har": "har",
    "dcase2020": "dcase",
    "fashion_mnist": "fashion_mnist",  # real data besides the paper's eight
    "digits": "digits",
}

SPLITS = ("train", "test")


def names() -> list[str]:
    """The registered dataset names: the paper's eight in its order, then the extra real ones."""
    return list(_REGISTRY)


def load(name: str, split: str, data_dir: str | None = None, **options):
    """Load one split of a dataset as a torch ``Dataset`` of ``(x, y)``.

    Args:
        name: one of :func:`names`.
        split: ``"train"`` or ``"test"``.
        data_dir: folder holding the dataset's real, official files; defaults to the
            ``TINYPROP_DATA`` environment variable. Without it, the offline source is used.
        options: dataset-specific options (e.g. a subset size), passed to the loader.

    Returns:
        A ``Dataset`` with attributes ``source``, ``num_classes`` and ``input_shape``, and
        ``tensors``: the whole split as ``(x, y)``.

    Example:
        >>> train = load("har", "train")
        >>> train.source, train.num_classes, train.input_shape
        ('basicmotions as har substitute', 4, (6, 100))
        >>> x, y = train.tensors  # (N, 6, 100) float32, (N,) int64 labels
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; choose one of {names()}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'test'")
    module = importlib.import_module(f"tinyprop.data.{_REGISTRY[name]}")
    return module.load(name, split, data_dir=data_dir, **options)


__all__ = ["names", "load", "cache_dir", "SPLITS"]
