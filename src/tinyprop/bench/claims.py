"""Per-run claim files: two ``tinyprop bench`` processes on one results folder run each run once.

Before a run starts, its process creates ``.NAME.claim`` beside the run's record with an
exclusive create (``O_CREAT | O_EXCL``: of two processes exactly one succeeds) holding its host
and process id; the claim is removed when the run ends, failed or not. A process finding a run
claimed leaves it to the claimer. A claim left by a process that died (same host, process gone)
is taken over.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path


def claim_path(record: Path) -> Path:
    """The claim file of the run whose record is ``record``."""
    return record.with_name(f".{record.name}.claim")


def _alive(holder: dict) -> bool:
    """Whether the claim's process may still be running (unknown hosts count as running)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return True
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def try_claim(record: Path) -> bool:
    """Claim the run of ``record`` for this process; False when another live process holds it."""
    path = claim_path(record)
    path.parent.mkdir(parents=True, exist_ok=True)
    mine = json.dumps({"host": socket.gethostname(), "pid": os.getpid()})
    for _ in range(2):  # a second try after taking over a dead process's claim
        try:
            handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text() or "{}")
            except (OSError, ValueError):
                return False  # being written right now by its creator
            if _alive(holder if isinstance(holder, dict) else {}):
                return False
            stale = path.with_name(f"{path.name}.{os.getpid()}.stale")
            try:
                os.replace(path, stale)  # one taker wins; the others find no file or a live one
                os.unlink(stale)
            except OSError:
                return False
            continue
        with os.fdopen(handle, "w") as file:
            file.write(mine)
        return True
    return False


def release(record: Path) -> None:
    """Remove this process's claim on the run of ``record`` (if it holds it)."""
    path = claim_path(record)
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if holder == {"host": socket.gethostname(), "pid": os.getpid()}:
        path.unlink(missing_ok=True)
