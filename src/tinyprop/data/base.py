"""The shared in-memory dataset (float32 inputs, int64 labels, their source) and its helpers:
where the real data lives (``data_dir`` / ``TINYPROP_DATA``) and the npz cache of built arrays."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset


class ArrayDataset(Dataset):
    """A dataset held as two tensors, labelled with its source.

    Every loader in :mod:`tinyprop.data` returns one of these, so results can always say which
    data produced them (``source``), and models can be sized from ``input_shape`` and
    ``num_classes``.

    Args:
        x: inputs, shape ``(N, *input_shape)``; converted to float32.
        y: integer labels, shape ``(N,)``; converted to int64, each in ``[0, num_classes)``.
        source: human-readable origin, e.g. ``"mnist"`` or ``"synthetic flowers102 stand-in"``.
        num_classes: number of classes of the task.

    Example:
        >>> ds = ArrayDataset(torch.zeros(4, 1, 28, 28), torch.tensor([0, 1, 2, 1]), "toy", 3)
        >>> len(ds), ds.input_shape, ds[1][1].item()
        (4, (1, 28, 28), 1)
    """

    def __init__(self, x: Tensor, y: Tensor, source: str, num_classes: int) -> None:
        x = torch.as_tensor(x)
        y = torch.as_tensor(y)
        if x.ndim < 1 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise ValueError(
                f"ArrayDataset needs x of shape (N, ...) and y of shape (N,); got x "
                f"{tuple(x.shape)} and y {tuple(y.shape)}: give one label per sample"
            )
        if y.is_floating_point():
            raise ValueError("ArrayDataset labels y must be integers, got a floating-point tensor")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(
                f"labels must lie in [0, {num_classes}); found range "
                f"[{int(y.min())}, {int(y.max())}]: check num_classes or the label mapping"
            )
        # x may be a broadcast view (e.g. one grey channel expanded to three): kept as is.
        self.x = x.to(torch.float32)  # (N, *input_shape)
        self.y = y.to(torch.int64).contiguous()  # (N,)
        self.source = str(source)
        self.num_classes = int(num_classes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample, e.g. ``(1, 28, 28)``."""
        return tuple(self.x.shape[1:])

    @property
    def tensors(self) -> tuple[Tensor, Tensor]:
        """All inputs and labels as ``(x, y)``: ``(N, *input_shape)`` float32, ``(N,)`` int64.

        ``x`` may be a broadcast view (grey images repeated to 3 channels): use ``reshape``,
        not ``view``, or ``.contiguous()`` first."""
        return self.x, self.y

    def __len__(self) -> int:
        return self.y.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.x[index], self.y[index]

    def __repr__(self) -> str:
        return (
            f"ArrayDataset(n={len(self)}, input_shape={self.input_shape}, "
            f"num_classes={self.num_classes}, source={self.source!r})"
        )


def resolve_data_dir(data_dir: str | Path | None) -> tuple[Path | None, bool]:
    """Where real datasets live: ``data_dir`` if given, else ``$TINYPROP_DATA``, else None.

    Returns:
        ``(folder, explicit)``; ``explicit`` is True when the caller passed ``data_dir`` (then a
        dataset missing there is an error), False when it came from the environment (then a
        loader falls back to its offline source).

    Example:
        >>> resolve_data_dir("/tmp")
        (PosixPath('/tmp'), True)
    """
    if data_dir is not None:
        folder, explicit = Path(data_dir).expanduser(), True
    elif os.environ.get("TINYPROP_DATA"):
        folder, explicit = Path(os.environ["TINYPROP_DATA"]).expanduser(), False
    else:
        return None, False
    if explicit and not folder.is_dir():
        raise FileNotFoundError(f"data_dir {folder} is not a folder: give an existing folder")
    return folder, explicit


def cache_key(params: dict) -> str:
    """A short stable hash of JSON-serialisable parameters, for cache file names."""
    text = json.dumps(params, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_arrays(
    stem: str, params: dict, build: Callable[[], dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Load arrays from the npz cache, or build them once and cache them.

    The file is ``cache_dir()/<stem>-<hash of params>.npz``, written atomically (safe when
    several processes build the same data at once) with the SHA-256 of its arrays; a cache file
    that is unreadable or fails that check is rebuilt with a warning.

    Args:
        stem: readable prefix of the file name, e.g. ``"flowers102-synthetic"``.
        params: everything the arrays depend on (seed, sizes, version, ...).
        build: makes the arrays when the cache misses.

    Returns:
        The arrays by name.

    Example:
        >>> arrays = cached_arrays("demo", {"n": 3}, lambda: {"x": np.arange(3)})
        >>> arrays["x"].tolist()
        [0, 1, 2]
    """
    from tinyprop.data.cache import cache_dir
    from tinyprop.data.npz_cache import read_verified, write_verified

    path = cache_dir() / f"{stem}-{cache_key(params)}.npz"
    arrays = read_verified(path)
    if arrays is None:
        arrays = build()
        write_verified(path, arrays, compressed=True)
    return arrays
