"""Finding a dataset's real, official files: ``data_dir`` or ``$TINYPROP_DATA``."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path


def find_real_root(
    dataset: str,
    data_dir: str | os.PathLike | None,
    is_root: Callable[[Path], bool],
    subfolders: Sequence[str],
    expected: str,
) -> Path | None:
    """The folder holding a dataset's official files, or None to use the offline source.

    ``data_dir`` (or, when it is None, ``$TINYPROP_DATA``) may be the dataset's own folder or a
    parent holding it under one of ``subfolders``. An explicit ``data_dir`` without the dataset
    is an error; ``$TINYPROP_DATA`` without it falls back to the offline source with a warning
    (it is shared by all datasets, and a user may have only some of them).

    Args:
        dataset: dataset name, for messages.
        data_dir: the folder given by the user, or None.
        is_root: tells whether a folder is the dataset's root.
        subfolders: usual names of the dataset's folder inside a parent folder.
        expected: a short description of the expected layout, for the error message.

    Returns:
        The dataset root, or None when no folder was given (offline source).

    Example:
        >>> find_real_root("har", None, lambda p: False, ["UCI HAR Dataset"], "")
    """
    explicit = data_dir is not None
    if data_dir is None:
        data_dir = os.environ.get("TINYPROP_DATA") or None
        if data_dir is None:
            return None
    base = Path(data_dir).expanduser()
    for candidate in [base, *(base / name for name in subfolders)]:
        if candidate.is_dir() and is_root(candidate):
            return candidate
    message = (
        f"no {dataset} data found in {base}: expected {expected} (directly in that folder or in "
        f"a subfolder named one of {list(subfolders)})"
    )
    if explicit:
        raise FileNotFoundError(
            message + "; download and extract the official archive there, or pass data_dir=None "
            "to use the offline source"
        )
    warnings.warn(message + "; using the offline source instead", stacklevel=3)
    return None
