"""Results store: one JSON record per run, written atomically; reading a results folder back."""

from __future__ import annotations

import json
import os
import subprocess
import warnings
from pathlib import Path

REQUIRED_KEYS = (
    "dataset", "source", "model", "policy", "settings", "protocol", "seed", "metric_name",
    "metric", "val_metric", "compute_ratio", "backward_ratio", "skip_rate", "wall_s", "commit",
)  # fmt: skip


def record_name(protocol: str, dataset: str, policy: str, settings_label: str, seed: int) -> str:
    """File name of one run's record, e.g. ``finetune__mnist__topk__ratio=0.1__seed0.json``."""
    return f"{protocol}__{dataset}__{policy}__{settings_label}__seed{seed}.json"


def write_record(path: os.PathLike, record: dict) -> None:
    """Write ``record`` as JSON to ``path`` atomically (a temporary file, then a rename), so an
    interrupted run never leaves a half-written record that a resume would take as finished."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    os.replace(temporary, path)


def read_records(folder: os.PathLike) -> list[dict]:
    """All run records (``*.json`` with the required keys) in ``folder``, sorted by file name.

    Files that are not records are skipped with a warning.

    Example:
        >>> read_records("benchmarks/results/small-finetune")  # doctest: +SKIP
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"results folder {folder} does not exist: run `tinyprop bench` first or check the path"
        )
    records = []
    for path in sorted(folder.glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            warnings.warn(f"skipping unreadable record {path}: {error}", stacklevel=2)
            continue
        if not isinstance(record, dict) or any(key not in record for key in REQUIRED_KEYS):
            warnings.warn(f"skipping {path}: not a run record (missing keys)", stacklevel=2)
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
