"""The native Linear backward of two versions of ``kernels.c``, call for call in one process.

Two-thread wall times on a shared machine swing by ten times from one call to the next (a
thread of the call waits for a core another job holds), so comparing runs of separate
processes says little. This builds ``kernels.c`` at a git revision and as it is in the working
tree, loads both, and times their ``tp_linear_backward_f32`` on the same random kept entries
alternately (which goes first alternates too), the caches flushed before each call as a
training step's forward would leave them. It prints, per version, the least and the median
time and the median of the paired ratios new / old; the least is the call that ran without
waiting for a core.

Run:
    python benchmarks/linear_kernel_ab.py --old main --threads 2
    python benchmarks/linear_kernel_ab.py --old HEAD~1 --threads 1 --batch 64 --gradients input
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from tinyprop.native import build

ROOT = Path(__file__).resolve().parent.parent
SOURCE = "src/tinyprop/native/kernels.c"


def compiled(source: str, folder: Path, name: str) -> tuple[ctypes.CDLL, bool]:
    """``source`` built as tinyprop builds it; also whether its Linear kernel takes the strip
    scratch (the argument before the thread count)."""
    path = folder / f"{name}.c"
    path.write_text(source)
    library = folder / f"{name}.so"
    command = [build._compiler(), *build.FLAGS, *build.OPENMP, str(path), "-o", str(library)]
    subprocess.run([*command, "-lm"], check=True)
    prototype = source[source.index("int tp_linear_backward_f32(") :].split("{", 1)[0]
    return ctypes.CDLL(str(library)), "float *strip" in prototype


def kept_entries(batch: int, outputs: int, k: int, generator) -> tuple[torch.Tensor, ...]:
    """CSR of ``k`` random outputs per sample, ascending, and their δ."""
    columns = torch.stack([torch.randperm(outputs, generator=generator)[:k] for _ in range(batch)])
    column = columns.sort(1).values.flatten().contiguous()  # (B · k,)
    value = torch.randn(column.numel(), generator=generator)
    row_start = torch.arange(batch + 1, dtype=torch.long) * k
    return row_start, column, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--old", default="main", help="git revision of the old kernels.c")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--outputs", type=int, default=2048)
    parser.add_argument("--inputs", type=int, default=2048)
    parser.add_argument("--keep", type=int, default=102, help="kept outputs per sample")
    parser.add_argument("--gradients", choices=["input", "weight", "both"], default="both")
    parser.add_argument("--calls", type=int, default=200, help="calls of each version")
    args = parser.parse_args()
    old_source = subprocess.run(
        ["git", "show", f"{args.old}:{SOURCE}"], cwd=ROOT, capture_output=True, text=True,
        check=True,
    ).stdout  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    batch, outputs, inputs = args.batch, args.outputs, args.inputs
    x, weight = torch.rand(batch, inputs, generator=generator), torch.rand(outputs, inputs)
    row_start, column, value = kept_entries(batch, outputs, args.keep, generator)
    needs_weight, needs_input = args.gradients != "input", args.gradients != "weight"
    grad_weight = torch.empty(outputs, inputs) if needs_weight else None
    grad_input = torch.empty(batch, inputs) if needs_input else None
    kept = column.numel()
    scratch = [torch.empty(outputs + 1, dtype=torch.long), torch.empty(kept, dtype=torch.long),
               torch.empty(kept)]  # fmt: skip
    strip = torch.empty(args.threads * 2 * min(outputs, 512) * 64)
    flush = torch.zeros(1 << 24)  # 64 MB
    with tempfile.TemporaryDirectory() as folder:
        versions = {
            "old": compiled(old_source, Path(folder), "old"),
            "new": compiled((ROOT / SOURCE).read_text(), Path(folder), "new"),
        }

        def call(name: str) -> float:
            library, takes_strip = versions[name]
            pointers = [t.data_ptr() if t is not None else None for t in (grad_weight, grad_input)]
            extra = [strip.data_ptr() if args.threads > 1 else None] if takes_strip else []
            flush.add_(1.0)
            start = time.perf_counter()
            status = library.tp_linear_backward_f32(
                ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(weight.data_ptr()),
                ctypes.c_int64(batch), ctypes.c_int64(outputs), ctypes.c_int64(inputs),
                *(ctypes.c_void_p(t.data_ptr()) for t in (row_start, column, value)),
                *(ctypes.c_void_p(p) for p in pointers),
                *(ctypes.c_void_p(t.data_ptr()) for t in scratch),
                *(ctypes.c_void_p(p) for p in extra), ctypes.c_int64(args.threads),
            )  # fmt: skip
            seconds = time.perf_counter() - start
            assert status == 0, status
            return seconds

        outputs_of = {}  # the same gradients bit for bit
        for name in versions:
            call(name)
            outputs_of[name] = [t.clone() for t in (grad_weight, grad_input) if t is not None]
        same = all(map(torch.equal, outputs_of["old"], outputs_of["new"]))
        times: dict[str, list[float]] = {"old": [], "new": []}
        for index in range(args.calls + 1):
            order = ("old", "new") if index % 2 else ("new", "old")
            for name in order:
                seconds = call(name)
                if index:  # the first round warms up
                    times[name].append(1e3 * seconds)
    ratios = [new / old for new, old in zip(times["new"], times["old"], strict=True)]
    print(
        f"Linear {inputs} -> {outputs}, batch {batch}, {args.keep} kept per sample, "
        f"{args.gradients} gradient(s), {args.threads} thread(s), {args.calls} calls each (ms):"
    )
    for name, values in times.items():
        label = args.old if name == "old" else "working tree"
        print(
            f"  {name} ({label}): least {min(values):.3f}, median {statistics.median(values):.3f}"
        )
    print(f"  new / old, median of the paired calls: {statistics.median(ratios):.2f}; "
          f"gradients {'identical' if same else 'DIFFERENT'}")  # fmt: skip


if __name__ == "__main__":
    main()
