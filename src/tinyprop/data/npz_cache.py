"""Load-or-build caching of NumPy arrays as ``.npz`` files under the data cache.

Every cache file stores the SHA-256 of its arrays (names, dtypes, shapes, bytes) beside them,
written with them in one atomic rename; a file that is unreadable, lacks it or no longer matches
it (truncated, edited: e.g. MNIST labels shifted by one) is rebuilt with a warning saying so.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tinyprop.data.cache import arrays_digest, cache_dir

DIGEST = "__sha256__"  # name of the stored SHA-256 of the other arrays


def cache_key(parameters: dict) -> str:
    """A short stable hash of JSON-serialisable parameters (to name a cache file)."""
    text = json.dumps(parameters, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_arrays(
    folder: str, stem: str, parameters: dict, build: Callable[[], dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Return the arrays cached for ``parameters``, building and saving them when missing.

    A cache file that cannot be read or fails its SHA-256 check is rebuilt with a warning.

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
    arrays = read_verified(path)
    if arrays is None:
        arrays = build()
        write_verified(path, arrays)
    return arrays


def read_verified(path: Path) -> dict[str, np.ndarray] | None:
    """The arrays of the cache file ``path`` when it is there, readable and still matches the
    SHA-256 stored in it; else None, with a warning when a file was there."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as error:
        warnings.warn(f"cache file {path} is unreadable ({error}); rebuilding it", stacklevel=3)
        return None
    recorded = arrays.pop(DIGEST, None)
    if recorded is None or str(recorded) != arrays_digest(arrays.items()):
        warnings.warn(
            f"cache file {path} does not match the SHA-256 recorded when it was written (changed,"
            " or written by an older tinyprop); rebuilding it",
            stacklevel=3,
        )
        return None
    return arrays


def write_verified(path: Path, arrays: dict[str, np.ndarray], compressed: bool = False) -> None:
    """Write ``arrays`` and their SHA-256 to ``path`` atomically (safe with concurrent writers)."""
    if DIGEST in arrays:
        raise ValueError(f"{DIGEST!r} is reserved for the cache's own SHA-256; rename that array")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    save = np.savez_compressed if compressed else np.savez
    save(temporary, **arrays, **{DIGEST: np.array(arrays_digest(arrays.items()))})
    os.replace(temporary, path)
