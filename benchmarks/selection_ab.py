"""The native selection of two versions of ``kernels.c``, call for call in one process.

As ``benchmarks/conv_kernel_ab.py`` does for the convolution kernels: builds ``kernels.c`` at a
git revision and as it is in the working tree, loads both, and runs their ``tp_topk_sums_f32``
(each row's Σ |δ| and its k entries of largest |δ|, what fixed-ratio top-k runs on the native
path) on the δ of every layer call of a training step of one of ``benchmarks/speed.py``'s
models under ``topk`` 0.05, alternately (which goes first alternates too), the caches flushed
before each round as a step's BatchNorm backward would leave them. It prints, per version, the
least and the median time of a round (every layer call once) and the median of the paired
ratios new / old, and whether both keep the same entries and sums bit for bit. One thread is
timed in process time, more threads in wall time.

Run:
    python benchmarks/selection_ab.py --old main --threads 1
    python benchmarks/selection_ab.py --old HEAD~1 --threads 2 --model "small CNN 16-32-32"
"""

from __future__ import annotations

import argparse
import ctypes
import math

import torch
from kernel_ab import compare_rounds, summary
from layer_kernels import captured_calls
from speed import MODELS


def selection_inputs(flat: torch.Tensor, keep: int, threads: int) -> dict:
    """The buffers ``tinyprop.native.topk_with_sums`` passes the kernel for δ (R, N), k."""
    rows, size = flat.shape
    return {
        "delta": flat.contiguous(),
        "keep": keep,
        "sums": torch.empty(rows),  # (R,)
        "row_start": torch.empty(rows + 1, dtype=torch.long),  # (R + 1,)
        "columns": torch.zeros(rows * keep, dtype=torch.long),  # (R k,) slots
        "values": torch.zeros(rows * keep),  # (R k,)
        "scratch": torch.empty(threads * 2 * size),  # (T, 2 N)
        "index_scratch": torch.empty(threads * size, dtype=torch.long),  # (T, N)
    }


def run(library: ctypes.CDLL, inputs: dict, threads: int) -> None:
    pointer = ctypes.c_void_p
    delta = inputs["delta"]
    status = library.tp_topk_sums_f32(
        pointer(delta.data_ptr()), ctypes.c_int64(delta.shape[0]), ctypes.c_int64(delta.shape[1]),
        ctypes.c_int64(inputs["keep"]),
        *(pointer(inputs[key].data_ptr()) for key in ("sums", "row_start", "columns", "values",
                                                      "scratch", "index_scratch")),
        ctypes.c_int64(threads),
    )  # fmt: skip
    assert status == 0, status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--old", default="main", help="git revision of the old kernels.c")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", choices=list(MODELS), default="MobileNet-style CNN")
    parser.add_argument("--rounds", type=int, default=100, help="rounds of each version")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    calls, _ = captured_calls(args.model)
    layers = []
    for _, _, _, _, flat, keep, *_ in calls:  # the selections the native path runs
        k = int(keep[0])
        if flat.shape[1] > 1 and bool((keep == k).all()) and 1 <= k <= flat.shape[1]:
            layers.append(selection_inputs(flat, k, args.threads))
    keys = ("sums", "row_start", "columns", "values")
    same, times = compare_rounds(
        args.old, run, layers, args.threads, args.rounds,
        lambda: [inputs[key] for inputs in layers for key in keys],
    )  # fmt: skip
    kept = sum(math.prod(inputs["columns"].shape) for inputs in layers)
    heading = (
        f"{args.model}: {len(layers)} selections ({kept} slots), {args.threads} thread(s), "
        f"{args.rounds} rounds each (ms per round):"
    )
    summary(heading, times, args.old, same, "rounds")


if __name__ == "__main__":
    main()
