"""Per-run claim files: two ``tinyprop bench`` processes on one results folder run each run once.

Before a run starts, its process creates ``.NAME.claim`` beside the run's record with an
exclusive create (``O_CREAT | O_EXCL``: of two processes exactly one succeeds) holding its host
and process id; the claim is removed when the run ends, failed or not. A process finding a run
claimed leaves it to the claimer, and says who holds it and which file to delete if that process
is gone. A claim left by a process that died is taken over: same host and the process gone, or
its process id now held by a process started after the claim was made, or a claim file left
empty for a minute (its creator died between creating and writing it). A claim from another
host cannot be checked from here: it stays until its holder releases it or the user deletes it.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

EMPTY_CLAIM_STALE_S = 60.0  # an empty claim file older than this was left by a dead creator


def claim_path(record: Path) -> Path:
    """The claim file of the run whose record is ``record``."""
    return record.with_name(f".{record.name}.claim")


def _alive(holder: dict, claimed_at: float) -> bool:
    """Whether the claim's process may still be running (unknown hosts count as running). A
    process holding the id that started after the claim was written is another process."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return True
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    started = _process_start(holder["pid"])
    return started is None or started <= claimed_at + 1.0  # 1 s: the clock tick of /proc


def _process_start(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), from /proc; None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(
            float(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _holder(path: Path) -> tuple[dict | None, float]:
    """The claim's holder ({} when unreadable, None when the file is gone) and its mtime."""
    try:
        claimed_at = path.stat().st_mtime
        holder = json.loads(path.read_text() or "{}")
    except FileNotFoundError:
        return None, 0.0
    except (OSError, ValueError):
        return {}, time.time()
    return (holder if isinstance(holder, dict) else {}), claimed_at


def _stale(holder: dict, claimed_at: float) -> bool:
    if not holder:  # empty: being written now, or its creator died before writing it
        return time.time() - claimed_at > EMPTY_CLAIM_STALE_S
    return not _alive(holder, claimed_at)


def describe_holder(record: Path) -> str:
    """Who holds the claim of ``record``'s run, and what to do if that process is gone."""
    path = claim_path(record)
    holder, claimed_at = _holder(path)
    if holder is None:
        return "another process finished it"
    who = f"process {holder.get('pid', '?')} on host {holder.get('host', '?')}"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(claimed_at))
    return (
        f"claimed by {who} since {since}; leaving it to that process (if it no longer runs, "
        f"e.g. it was killed on another machine, delete {path} and run again)"
    )


def try_claim(record: Path) -> bool:
    """Claim the run of ``record`` for this process; False when another live process holds it."""
    path = claim_path(record)
    path.parent.mkdir(parents=True, exist_ok=True)
    mine = json.dumps({"host": socket.gethostname(), "pid": os.getpid()})
    for _ in range(2):  # a second try after taking over a dead process's claim
        try:
            handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder, claimed_at = _holder(path)
            if holder is not None and not _stale(holder, claimed_at):
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
