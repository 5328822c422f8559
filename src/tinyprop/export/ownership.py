"""What ``tinyprop export`` may overwrite: only files it wrote itself and nobody changed since.

Every export records the SHA-256 of each file it wrote in ``.tinyprop-export.json`` in the output
folder. Before writing, a file export would replace that is not in that record (the user's own
``Makefile`` or ``main.c``), or that changed since, stops the export unless ``force`` is given.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tinyprop.data.cache import sha256

MANIFEST = ".tinyprop-export.json"


def _written(out: Path) -> dict[str, str]:
    """The files the last export into ``out`` wrote, by relative path, with their SHA-256."""
    try:
        record = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def refuse_foreign_files(out: Path, names: list[str], force: bool) -> None:
    """Raise FileExistsError naming the files among ``names`` (relative to ``out``) that exist
    and were not written, unchanged, by an earlier export; nothing when ``force``."""
    if force:
        return
    written = _written(out)
    foreign = [
        name
        for name in names
        if (out / name).exists()
        and not ((out / name).is_file() and written.get(name) == sha256(out / name))
    ]
    if foreign:
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        shown = ", ".join(foreign[:5]) + more
        raise FileExistsError(
            f"{out} already holds {shown}, which tinyprop export did not write (or which changed "
            "since); choose an empty --out folder, or pass --force to overwrite them"
        )


def record_written(out: Path, files: list[Path]) -> None:
    """Record the SHA-256 of every file just written into ``out``."""
    written = _written(out)
    written.update({str(path.relative_to(out)): sha256(path) for path in files})
    temporary = out / f".{MANIFEST}.{os.getpid()}.tmp"
    temporary.write_text(json.dumps(written, indent=1, sort_keys=True) + "\n")
    os.replace(temporary, out / MANIFEST)
