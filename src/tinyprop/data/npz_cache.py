"""Load-or-build caching of NumPy arrays as ``.npz`` files under the data cache."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tinyprop.data.cache import cache_dir


def cache_key(parameters: dict) -> str:
    """A short stable hash of JSON-serialisable parameters (to name a cache file)."""
    text = json.dumps(parameters, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_arrays(
    folder: str, stem: str, parameters: dict, build: Callable[[], dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Return the arrays cached for ``parameters``, building and saving them when missing.

    A cache file that cannot be read (interrupted write, disk error) is rebuilt with a warning.

    Args:
        folder: subfolder of :func:`tinyprop.data.cache_dir`.
        stem: file name prefix.
        parameters: everything the arrays depend on; hashed into the file name.
        build: makes the arrays when they are not cached.

    Returns:
        The arrays by name.

    Example:
        >>> cached_arrays("toy", "ones", {"n": 3}, lambda: {"x": np.ones(3)})["x"]  # doctest: +SKIP
    """
    path = Path(cache_dir()) / folder / f"{stem}-{cache_key(parameters)}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as archive:
                return {name: archive[name] for name in archive.files}
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as error:
            warnings.warn(f"cache file {path} is unreadable ({error}); rebuilding it", stacklevel=2)
    arrays = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(temporary, **arrays)
    os.replace(temporary, path)
    return arrays
