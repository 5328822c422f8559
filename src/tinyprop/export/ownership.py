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


def refuse_package_folders(out: Path, package: Path, runtime: Path) -> None:
    """Raise ValueError when ``out`` lies inside the installed ``package`` or the C ``runtime``
    it copies from, or would copy ``runtime`` onto itself (``out/runtime`` is it): an export
    there wrote its Makefile, main.c and header among the library's own files (``--force``
    replaced them), whatever ``force`` says."""
    resolved = out.resolve()
    for folder, what in ((package, "the installed tinyprop package"), (runtime, "the C runtime")):
        folder = folder.resolve()
        if resolved == folder:
            where = f"is {what}"
        elif folder in resolved.parents:
            where = f"lies inside {what}"
        elif (resolved / "runtime").resolve() == folder:
            where = f"holds {what} as its runtime/ folder (the copy would be made onto itself)"
        else:
            continue
        raise ValueError(
            f"--out {out} {where} ({folder}); an export there would write among the library's "
            "own files (--force replaced them). Choose a folder of your own"
        )


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
