"""The native Linear backward (or SGD's fused update) of two versions of ``kernels.c``, call
for call in one process.

Two-thread wall times on a shared machine swing by ten times from one call to the next (a
thread of the call waits for a core another job holds), so comparing runs of separate
processes says little. This builds ``kernels.c`` at a git revision and as it is in the working
tree, loads both, and times their ``tp_linear_backward_f32`` on the same random kept entries
alternately (which goes first alternates too), the caches flushed before each call as a
training step's forward would leave them. It prints, per version, the least and the median
time and the median of the paired ratios new / old; the least is the call that ran without
waiting for a core. ``--gradients update`` times ``tp_linear_update_f32`` instead (SGD's
fused update, lr 0.01): each version updates its own copy of the same weight in place, the
same number of times, so the copies must end equal. ``--gradients input+update`` times what
``train_step(fused_update=True)`` asks of a layer below the top: the input gradient and SGD's
update, in one call where the version has ``tp_linear_input_update_f32`` (one walk down the
weight's rows), else the input gradient's call then the update's; each version updates its own
copy of the weight and writes its own input gradient, which must end equal.

Run:
    python benchmarks/linear_kernel_ab.py --old main --threads 2
    python benchmarks/linear_kernel_ab.py --old HEAD~1 --threads 1 --batch 64 --gradients input
    python benchmarks/linear_kernel_ab.py --old HEAD --threads 2 --strips old  # strips vs walk
    python benchmarks/linear_kernel_ab.py --old HEAD~1 --threads 1 --batch 64 --gradients update
    python benchmarks/linear_kernel_ab.py --old main --threads 1 --gradients input+update
"""

from __future__ import annotations

import argparse
import ctypes
import tempfile
import time
from pathlib import Path

import kernel_ab
import torch
from kernel_ab import alternate, identical, source_at, summary


def compiled(source: str, folder: Path, name: str) -> tuple[ctypes.CDLL, bool]:
    """``source`` built as tinyprop builds it; also whether its Linear kernel takes the strip
    scratch (the argument before the thread count)."""
    prototype = source[source.index("int tp_linear_backward_f32(") :].split("{", 1)[0]
    return kernel_ab.compiled(source, folder, name), "float *strip" in prototype


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
    parser.add_argument(
        "--gradients", choices=["input", "weight", "both", "update", "input+update"], default="both"
    )
    parser.add_argument("--calls", type=int, default=200, help="calls of each version")
    parser.add_argument(
        "--strips",
        choices=["none", "old", "both"],
        default="none",
        help="versions given each thread's strip copies (2+ threads; tinyprop passes none)",
    )
    args = parser.parse_args()
    old_source = source_at(args.old)
    generator = torch.Generator().manual_seed(0)
    batch, outputs, inputs = args.batch, args.outputs, args.inputs
    x, weight = torch.rand(batch, inputs, generator=generator), torch.rand(outputs, inputs)
    row_start, column, value = kept_entries(batch, outputs, args.keep, generator)
    update = args.gradients in ("update", "input+update")  # a weight per version, in place
    needs_weight = args.gradients in ("weight", "both")
    needs_input = args.gradients in ("input", "both")
    walked = {name: torch.empty(batch, inputs) for name in ("old", "new")}  # input+update's
    grad_weight = torch.empty(outputs, inputs) if needs_weight else None
    grad_input = torch.empty(batch, inputs) if needs_input else None
    updated = {name: weight.clone() for name in ("old", "new")}  # (out, in) each
    kept = column.numel()
    scratch = [torch.empty(outputs + 1, dtype=torch.long), torch.empty(kept, dtype=torch.long),
               torch.empty(kept)]  # fmt: skip
    strip = torch.empty(args.threads * 2 * min(outputs, 512) * 64)
    flush = torch.zeros(1 << 24)  # 64 MB
    with tempfile.TemporaryDirectory() as folder:
        versions = {
            "old": compiled(old_source, Path(folder), "old"),
            "new": compiled(source_at(None), Path(folder), "new"),
        }

        def input_and_update(library: ctypes.CDLL, name: str) -> int:
            """The input gradient and SGD's update (lr 0.01) of ``name``'s weight."""
            sizes = (ctypes.c_int64(batch), ctypes.c_int64(outputs), ctypes.c_int64(inputs))
            entries = [ctypes.c_void_p(t.data_ptr()) for t in (row_start, column, value)]
            regroup = [ctypes.c_void_p(t.data_ptr()) for t in scratch]
            w, g = (ctypes.c_void_p(t.data_ptr()) for t in (updated[name], walked[name]))
            if hasattr(library, "tp_linear_input_update_f32"):  # one walk
                return library.tp_linear_input_update_f32(
                    ctypes.c_void_p(x.data_ptr()), w, *sizes, *entries, g, ctypes.c_int64(0),
                    ctypes.c_float(-0.01), None, ctypes.c_float(0.0), ctypes.c_float(1.0),
                    ctypes.c_int64(0), ctypes.c_int64(0), *regroup, ctypes.c_int64(args.threads),
                )  # fmt: skip
            extra = [None] if versions[name][1] else []
            status = library.tp_linear_backward_f32(
                ctypes.c_void_p(x.data_ptr()), w, *sizes, *entries, None, g, *regroup, *extra,
                ctypes.c_int64(args.threads),
            )  # fmt: skip
            return status or library.tp_linear_update_f32(
                ctypes.c_void_p(x.data_ptr()), w, *sizes, *entries, ctypes.c_float(-0.01),
                *regroup, ctypes.c_int64(args.threads),
            )  # fmt: skip

        def call(name: str) -> float:
            library, takes_strip = versions[name]
            pointers = [t.data_ptr() if t is not None else None for t in (grad_weight, grad_input)]
            with_strips = args.threads > 1 and args.strips in (name, "both")
            extra = [strip.data_ptr() if with_strips else None] if takes_strip else []
            flush.add_(1.0)
            start = time.perf_counter()
            if args.gradients == "input+update":
                status = input_and_update(library, name)
                seconds = time.perf_counter() - start
                assert status == 0, status
                return seconds
            if update:
                status = library.tp_linear_update_f32(
                    ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(updated[name].data_ptr()),
                    ctypes.c_int64(batch), ctypes.c_int64(outputs), ctypes.c_int64(inputs),
                    *(ctypes.c_void_p(t.data_ptr()) for t in (row_start, column, value)),
                    ctypes.c_float(-0.01), *(ctypes.c_void_p(t.data_ptr()) for t in scratch),
                    ctypes.c_int64(args.threads),
                )  # fmt: skip
                seconds = time.perf_counter() - start
                assert status == 0, status
                return seconds
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

        if update:  # as many updates of each copy: the same weights bit for bit
            times = alternate(call, args.calls)
            same = torch.equal(updated["old"], updated["new"])
            same = same and torch.equal(walked["old"], walked["new"])
        else:
            same = identical(call, lambda: [grad_weight, grad_input])  # the same bit for bit
            times = alternate(call, args.calls)
    what = {"update": "SGD's fused update", "input+update": "input gradient + SGD's update"}.get(
        args.gradients, f"{args.gradients} gradient(s)"
    )
    heading = (
        f"Linear {inputs} -> {outputs}, batch {batch}, {args.keep} kept per sample, "
        f"{what}, {args.threads} thread(s), {args.calls} calls each (ms):"
    )
    summary(heading, times, args.old, same, "calls")


if __name__ == "__main__":
    main()
