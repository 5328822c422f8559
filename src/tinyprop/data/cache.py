"""Where fetched and generated data is cached (never committed)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


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
