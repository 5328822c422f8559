"""The harness the A/B benchmarks of two versions of ``kernels.c`` share.

``conv_kernel_ab.py``, ``linear_kernel_ab.py``, ``selection_ab.py`` and ``small_cnn_ab.py``
build ``kernels.c`` at a git revision ("old") and as it is in the working tree ("new"), load both
into one process and time them alternately, since separate processes on a shared machine differ
by more than a kernel change saves. This module builds and loads a version, alternates the timed
calls and prints the summary.
"""

from __future__ import annotations

import ctypes
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from tinyprop.native import build

ROOT = Path(__file__).resolve().parent.parent
SOURCE = "src/tinyprop/native/kernels.c"


def source_at(revision: str | None) -> str:
    """The text of ``kernels.c`` at git ``revision``, or in the working tree if it is None."""
    if revision is None:
        return (ROOT / SOURCE).read_text()
    return subprocess.run(
        ["git", "show", f"{revision}:{SOURCE}"], cwd=ROOT, capture_output=True, text=True,
        check=True,
    ).stdout  # fmt: skip


def compiled(source: str, folder: Path, name: str) -> ctypes.CDLL:
    """``source`` built as tinyprop builds it, into ``folder``/``name``.so, and loaded."""
    path = folder / f"{name}.c"
    path.write_text(source)
    library = folder / f"{name}.so"
    command = [build._compiler(), *build.FLAGS, *build.OPENMP, str(path), "-o", str(library)]
    subprocess.run([*command, "-lm"], check=True)
    return ctypes.CDLL(str(library))


def identical(call: Callable[[str], object], outputs: Callable[[], list]) -> bool:
    """Whether one ``call`` of "old" and one of "new" leave the same ``outputs()`` (the tensors
    a call writes, None for one it skips) bit for bit."""
    outputs_of = {}
    for name in ("old", "new"):
        call(name)
        outputs_of[name] = [t.clone() for t in outputs() if t is not None]
    return all(map(torch.equal, outputs_of["old"], outputs_of["new"]))


def alternate(call: Callable[[str], float], rounds: int) -> dict[str, list[float]]:
    """Milliseconds of ``rounds`` timed calls of "old" and of "new" (``call(name)`` returns
    seconds), taking turns: one more round first warms up, and which goes first alternates
    from round to round."""
    times: dict[str, list[float]] = {"old": [], "new": []}
    for index in range(rounds + 1):
        for name in ("old", "new") if index % 2 else ("new", "old"):
            seconds = call(name)
            if index:  # the first round warms up
                times[name].append(1e3 * seconds)
    return times


def compare_rounds(
    revision: str,
    run: Callable[[ctypes.CDLL, dict, int], None],
    layers: list[dict],
    threads: int,
    rounds: int,
    outputs: Callable[[], list],
) -> tuple[bool, dict[str, list[float]]]:
    """``kernels.c`` at ``revision`` ("old") against the working tree's ("new"): a round runs
    ``run(library, inputs, threads)`` for every captured call's ``inputs`` in ``layers``, the
    caches flushed first (as a step's forward leaves them). Returns whether one round of each
    left the same ``outputs()`` bit for bit, and the milliseconds of ``rounds`` alternated
    rounds; one thread is timed by process time (a wait for a core counts nothing), more by
    wall time."""
    old_source = source_at(revision)
    flush = torch.zeros(1 << 24)  # 64 MB
    clock = time.process_time if threads == 1 else time.perf_counter
    with tempfile.TemporaryDirectory() as folder:
        versions = {
            "old": compiled(old_source, Path(folder), "old"),
            "new": compiled(source_at(None), Path(folder), "new"),
        }

        def round_of(name: str) -> float:
            flush.add_(1.0)
            start = clock()
            for inputs in layers:
                run(versions[name], inputs, threads)
            return clock() - start

        return identical(round_of, outputs), alternate(round_of, rounds)


def summary(
    heading: str, times: dict[str, list[float]], revision: str, same: bool, unit: str
) -> None:
    """Print ``heading``, the least and the median time per version (``revision`` is the old
    one's), the median of the paired ratios new / old of the ``unit`` ("rounds", "calls")
    and whether the gradients were ``same``."""
    ratios = [new / old for new, old in zip(times["new"], times["old"], strict=True)]
    print(heading)
    for name, values in times.items():
        label = revision if name == "old" else "working tree"
        print(
            f"  {name} ({label}): least {min(values):.3f}, median {statistics.median(values):.3f}"
        )
    print(f"  new / old, median of the paired {unit}: {statistics.median(ratios):.2f}; "
          f"gradients {'identical' if same else 'DIFFERENT'}")  # fmt: skip
