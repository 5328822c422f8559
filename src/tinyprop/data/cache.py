"""Where fetched and generated data is cached (never committed), and how cached files are
verified: every file tinyprop reads back from its cache carries a SHA-256 recorded when it was
written and is rebuilt when the two differ (truncated, emptied, edited or planted files)."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable
from pathlib import Path

import numpy as np


def cache_dir() -> Path:
    """The cache folder: ``$TINYPROP_CACHE``, else ``.cache/tinyprop`` in a source checkout
    (git-ignored), else ``~/.cache/tinyprop``."""
    if os.environ.get("TINYPROP_CACHE"):
        path = Path(os.environ["TINYPROP_CACHE"])
    else:
        checkout = Path(__file__).resolve().parents[3]
        if (checkout / "pyproject.toml").is_file() and (checkout / ".git").exists():
            path = checkout / ".cache" / "tinyprop"
        else:
            path = Path.home() / ".cache" / "tinyprop"
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256(path: Path) -> str:
    """SHA-256 hex digest of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def arrays_digest(arrays: Iterable[tuple[str, object]]) -> str:
    """SHA-256 of named arrays or tensors (name, dtype, shape and bytes of each, by name), the
    digest a cache file stores beside its arrays so that any change to them is detected."""
    digest = hashlib.sha256()
    for name, value in sorted(arrays, key=lambda item: item[0]):
        if hasattr(value, "detach"):  # a torch.Tensor: its raw bytes, whatever the dtype
            import torch

            value = value.detach().cpu().contiguous()
            kind, shape = str(value.dtype), tuple(value.shape)
            data = value.reshape(-1).view(torch.uint8).numpy().tobytes()
        else:
            value = np.ascontiguousarray(value)
            kind, shape, data = value.dtype.str, value.shape, value.tobytes()
        digest.update(f"{name}\0{kind}\0{shape}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def digest_path(path: Path) -> Path:
    """The file that records ``path``'s SHA-256 (``NAME.sha256`` beside it)."""
    return path.with_name(path.name + ".sha256")


def record_digest(path: Path) -> None:
    """Record ``path``'s SHA-256 in :func:`digest_path` (atomically), right after writing it."""
    record = digest_path(path)
    temporary = record.with_name(f".{record.name}.{os.getpid()}.tmp")
    temporary.write_text(sha256(path) + "\n")
    os.replace(temporary, record)


def digest_matches(path: Path) -> bool:
    """Whether ``path`` exists, is ours (owner, not writable by others) and still has the
    SHA-256 recorded when it was written."""
    try:
        info = path.stat()
        recorded = digest_path(path).read_text().strip()
    except OSError:
        return False
    if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return False
    return len(recorded) == 64 and sha256(path) == recorded


def private_folder(path: Path) -> Path | None:
    """``path`` created if needed with mode 0700 and checked: owned by this user and writable by
    no one else. Returns None (nothing there to trust) when another user owns it."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = path.stat()
    if info.st_uid != os.getuid():
        return None
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path
