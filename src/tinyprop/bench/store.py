"""Results store: one JSON record per run, written atomically; reading a results folder back."""

from __future__ import annotations

import json
import math
import os
import subprocess
import tempfile
import warnings
from pathlib import Path

REQUIRED_KEYS = (
    "dataset", "source", "model", "policy", "settings", "protocol", "seed", "metric_name",
    "metric", "val_metric", "compute_ratio", "backward_ratio", "skip_rate", "wall_s", "commit",
)  # fmt: skip
TEXT_KEYS = ("dataset", "source", "model", "policy", "protocol", "metric_name", "commit")
NUMBER_KEYS = ("metric", "val_metric", "compute_ratio", "backward_ratio", "skip_rate", "wall_s")
# entries the report reads when a record has them: text, or a number (null allowed)
OPTIONAL_TEXT_KEYS = ("settings_label", "val_metric_name")
OPTIONAL_NUMBER_KEYS = ("pretrained_metric", "val_samples")
# what each number can be: a share of the batch, MACs over full training's, seconds, or a
# metric in percent (accuracy, AUC) or the negative MSE
RANGES = {
    "skip_rate": (0.0, 1.0), "compute_ratio": (0.0, math.inf),
    "backward_ratio": (0.0, math.inf), "wall_s": (0.0, math.inf),
}  # fmt: skip
METRIC_RANGES = {"accuracy": (0.0, 100.0), "auc": (0.0, 100.0), "neg_mse": (-math.inf, 0.0)}


def _is_number(value) -> bool:
    """A finite JSON number (not a bool, NaN or Infinity)."""
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


def _out_of_range(record: dict) -> list[str]:
    """The numbers of a well-typed record outside what a run can give (a skip rate of 2, a
    negative compute ratio, an accuracy of -5 or 1e308)."""
    ranges = dict(RANGES)
    for key, name_key in (("metric", "metric_name"), ("val_metric", "val_metric_name")):
        name = record.get(name_key, record["metric_name"])
        if name in METRIC_RANGES:
            ranges[key] = METRIC_RANGES[name]
    if record.get("pretrained_metric") is not None and record["metric_name"] in METRIC_RANGES:
        ranges["pretrained_metric"] = METRIC_RANGES[record["metric_name"]]
    return [
        f"{key} {record[key]!r} (outside [{low:g}, {high:g}])"
        for key, (low, high) in ranges.items()
        if not low <= record[key] <= high
    ]


def record_problem(record: object) -> str | None:
    """What makes ``record`` unusable as a run record (missing keys, wrong types), or None."""
    if not isinstance(record, dict):
        return f"holds a JSON {type(record).__name__}, not a run record"
    missing = [key for key in REQUIRED_KEYS if key not in record]
    if missing:
        return f"incomplete record: missing {', '.join(missing)}"
    wrong = [key for key in TEXT_KEYS if not isinstance(record[key], str)]
    wrong += [
        key
        for key in NUMBER_KEYS
        if isinstance(record[key], bool) or not isinstance(record[key], int | float)
    ]
    # JSON's NaN / Infinity (a hand-edited record): the report's statistics failed on them with
    # a traceback (statistics.stdev: "'float' object has no attribute 'numerator'")
    wrong += [key for key in NUMBER_KEYS if key not in wrong and not math.isfinite(record[key])]
    if isinstance(record["seed"], bool) or not isinstance(record["seed"], int):
        wrong.append("seed")
    if not isinstance(record["settings"], dict):
        wrong.append("settings")
    wrong += [k for k in OPTIONAL_TEXT_KEYS if k in record and not isinstance(record[k], str)]
    wrong += [
        key
        for key in OPTIONAL_NUMBER_KEYS
        if record.get(key) is not None and not _is_number(record[key])
    ]
    if wrong:  # a settings_label of 5 stopped the report with an AttributeError traceback
        return f"wrong types for {', '.join(wrong)}"
    outside = _out_of_range(record)  # reported as they were, silently
    return f"impossible values: {', '.join(outside)}" if outside else None


MAX_RECORD_BYTES = 16 * 2**20  # a run record is a few kilobytes (the largest kept: 62 KB)


def load_record(path: os.PathLike) -> tuple[dict | None, str | None]:
    """``(record, None)`` for a valid run record at ``path``, else ``(None, why not)`` (missing,
    unreadable, binary garbage, truncated JSON, incomplete)."""
    path = Path(path)
    try:
        if not path.is_file():  # a symlink to /dev/zero would be read forever
            return (None, "not a regular file") if path.exists() else (None, "missing")
        if path.stat().st_size > MAX_RECORD_BYTES:
            return None, f"too large ({path.stat().st_size} bytes) for a run record"
        record = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        return None, "missing"
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:  # deep nesting
        return None, f"unreadable ({type(error).__name__}: {str(error)[:100]})"
    problem = record_problem(record)
    return (None, problem) if problem else (record, None)


def check_writable(folder: os.PathLike) -> None:
    """Raise OSError saying what to do unless records can be written into ``folder`` (created if
    needed): checked before any run starts, so no finished work is lost to it."""
    folder = Path(folder)
    blocking = next((part for part in (folder, *folder.parents) if part.is_file()), None)
    if blocking is not None:
        raise NotADirectoryError(
            f"cannot write records into {folder}: {blocking} is a file; choose a folder"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as error:
        raise OSError(
            f"cannot write records into {folder} ({error.strerror or error}); choose a folder "
            "you can write to"
        ) from None


def record_name(protocol: str, dataset: str, policy: str, settings_label: str, seed: int) -> str:
    """File name of one run's record, e.g. ``finetune__mnist__topk__ratio=0.1__seed0.json``."""
    return f"{protocol}__{dataset}__{policy}__{settings_label}__seed{seed}.json"


def check_output_file(path: os.PathLike, flag: str) -> None:
    """Raise OSError saying what to do unless a file can be written to ``path`` by a rename
    (as :func:`write_record` writes): checked before a run starts. A folder, or a device, FIFO
    or socket (``/dev/null``, ``/dev/full``, ``/dev/stdout`` in a pipe) would be replaced by
    a regular file; as root, the device node itself."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {path} is a folder; give a file path")
    not_regular_file(path, flag)
    check_writable(path.resolve().parent)


def not_regular_file(path: os.PathLike, what: str) -> None:
    """Raise OSError when ``path`` exists (through its symlinks) and is not a regular file
    (a folder, a device, a FIFO, a socket): a rename onto it would replace it."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise OSError(
            f"{what} {path} is not a regular file (a folder, device, FIFO or socket); writing "
            "a file there would replace it: give the path of a file"
        )


def write_record(path: os.PathLike, record: dict) -> None:
    """Write ``record`` as JSON to ``path`` atomically (a temporary file, then a rename), so an
    interrupted run never leaves a half-written record that a resume would take as finished.
    A symlink's target is written (the link stays); a path that is not a regular file
    (``/dev/null``) raises OSError instead of being replaced."""
    path = Path(path)
    not_regular_file(path, "record")
    path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    os.replace(temporary, path)


def read_records(folder: os.PathLike) -> list[dict]:
    """All run records (``*.json`` with the required keys) in ``folder``, sorted by file name.

    Files that are not valid records (unreadable, binary, truncated, incomplete) are skipped
    with a warning naming each.

    Example:
        >>> read_records("benchmarks/results/small-finetune")  # doctest: +SKIP
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(
            f"{folder} is a file, not a results folder: give the folder holding the run "
            f"records (e.g. {folder.parent})"
        )
    if not folder.is_dir():
        raise FileNotFoundError(
            f"results folder {folder} does not exist: run `tinyprop bench` first or check the path"
        )
    records = []
    for path in sorted(folder.glob("*.json")):
        record, problem = load_record(path)
        if problem is not None:
            warnings.warn(f"skipping {path}: {problem}", stacklevel=2)
            continue
        records.append(record)
    return records


def commit_hash() -> str | None:
    """Short git hash of the tinyprop checkout this code runs from, or None when it does not run
    from one (an installed wheel, even one whose virtual environment sits inside some other git
    repository: that repository's commit says nothing about this code)."""
    package = Path(__file__).resolve().parents[1]  # .../src/tinyprop in a checkout
    root = package.parents[1]
    if package.parent.name != "src" or not (root / "pyproject.toml").is_file():
        return None
    try:
        top = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--show-toplevel", "--short", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.split()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    if len(top) != 2 or Path(top[0]).resolve() != root:
        return None
    return top[1]
