"""Per layer call of one training step: what each kernel the sparse backward can choose costs.

For one of ``benchmarks/speed.py``'s models under ``topk`` 0.05 (per-sample), every layer
call's inputs are captured in a step, then timed (best of a few repeats; process time, or wall
time with ``--clock wall``):
the native sparse kernel on the kept entries, the dense kernels on the masked δ, and the
selection that both need. The ledger counts the same k · fan-in whichever runs; this says
which one is cheaper where, and why a step can cost more than its MACs.

Run:
    python benchmarks/layer_kernels.py "small CNN 16-32-32"
    python benchmarks/layer_kernels.py "MobileNet-style CNN" --threads 2
    python benchmarks/layer_kernels.py "wide MLP 784-2048-2048-10" --threads 2 --clock wall
"""

from __future__ import annotations

import argparse
import time

import torch
from speed import MODELS, POLICIES, keep_freed_memory, padded_mnist
from torch import nn

import tinyprop
from tinyprop import autograd, native
from tinyprop.patches import LinearPatches


def captured_calls(model_name: str) -> tuple[list[tuple], dict[str, str]]:
    """The arguments of every layer call's gradient computation in the second step (backward
    order), and the kernel each layer ran there."""
    build, batch_size, side, _ = MODELS[model_name]
    x, y = padded_mnist(side, limit=2 * batch_size)  # (N, 1, side, side)
    calls, original = [], autograd._gradients

    def capture(select, geometry, inputs, weight, rows, flat, keep, everything, *needs_and_defer):
        needs = needs_and_defer[:2]  # needs_input, needs_weight (then train_step's defer)
        calls.append((geometry, inputs.detach(), weight.detach(), rows, flat, keep, *needs))
        return original(
            select, geometry, inputs, weight, rows, flat, keep, everything, *needs_and_defer
        )

    torch.manual_seed(0)
    model = tinyprop.apply(build(), POLICIES["topk 0.05"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    autograd._gradients = capture
    try:
        for step in range(2):
            calls.clear()
            batch = slice(step * batch_size, (step + 1) * batch_size)
            loss_fn = nn.CrossEntropyLoss(reduction="none")
            stats = tinyprop.train_step(model, x[batch], y[batch], loss_fn, optimizer)
    finally:
        autograd._gradients = original
    return calls, stats.kernels


CLOCK = {"process": time.process_time, "wall": time.perf_counter}
clock = time.process_time  # --clock: process time (all threads' CPU time), or wall time


def milliseconds(function, repeats: int = 5, inner: int = 5) -> float:
    """Best time of ``inner`` calls over ``repeats``, per call."""
    function()
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        for _ in range(inner):
            function()
        best = min(best, (clock() - start) / inner)
    return 1000 * best


def timed_row(index: int, call: tuple, repeats: int = 5) -> tuple[str, list[float]]:
    """One table row: the call's shape, k and the three kernels' times (also returned, ms)."""
    geometry, inputs, weight, rows, flat, keep, needs_input, needs_weight = call
    masked = native.topk(flat, keep, masked=True)  # (R', N)
    _, column, value = native.topk(flat, keep, with_rows=False)  # (M,) each
    row_start = torch.zeros(inputs.shape[0] + 1, dtype=torch.long)  # (B + 1,) CSR
    row_start[rows + 1] = keep
    row_start = row_start.cumsum(0)
    needs = (needs_input, needs_weight)
    dense = milliseconds(
        lambda: geometry.dense_gradients(inputs, weight, rows, masked, *needs), repeats
    )
    sparse = milliseconds(
        lambda: geometry.native_gradients(inputs, weight, row_start, column, value, *needs),
        repeats,
    )
    selection = milliseconds(lambda: native.topk(flat, keep, with_rows=False), repeats)
    linear = isinstance(geometry, LinearPatches)
    shape = f"{weight.shape[1] if linear else geometry.channels_in} -> {geometry.channels_out}"
    row = (
        f"| {index} | {shape} ({geometry.groups}) | {geometry.fan_in} | {geometry.positions} "
        f"| {rows.numel()} | {int(keep[0])} | {sparse:.2f} | {dense:.2f} | {selection:.2f} |"
    )
    return row, [sparse, dense, selection]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", choices=list(MODELS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--repeats", type=int, default=5, help="best of this many timings of 5 calls each"
    )
    parser.add_argument(
        "--clock", choices=list(CLOCK), default="process",
        help="process time (one thread: its CPU time) or wall time (more threads: the call's "
        "duration; process time would add up every thread's, spinning included)",
    )  # fmt: skip
    args = parser.parse_args()
    global clock
    clock = CLOCK[args.clock]
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    print(f"{args.model}, topk 0.05, {args.threads} torch thread(s), ms per layer call "
          f"({args.clock} time)")  # fmt: skip
    print("| call | C_in -> C_out (groups) | fan-in | positions | rows | k | native sparse "
          "| dense on masked δ | selection |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    calls, kernels = captured_calls(args.model)
    totals = [0.0, 0.0, 0.0]
    for index, call in enumerate(calls):  # backward order: the output layer first
        row, times = timed_row(index, call, args.repeats)
        totals = [total + time for total, time in zip(totals, times, strict=True)]
        print(row)
    print("| all | | | | | | " + " | ".join(f"{total:.2f}" for total in totals) + " |")
    print("kernels the step ran, by layer: " + "; ".join(f"{k}: {v}" for k, v in kernels.items()))


if __name__ == "__main__":
    main()
