"""The small CNN's fused Conv2d -> ReLU -> MaxPool2d backward (tinyprop.pool_fusion), per block.

Two measurements under ``topk`` 0.05, process time (one thread by default):

1. per kernel, on the fused nodes' inputs captured in a step (the pooled gradient, the pooled
   values and the window maxima): δ written from them (``relu_unpool``, and with its sums),
   PyTorch's |δ| sum and bias sum over δ, top-k of the written δ, and the pooled top-k that
   selects without writing δ; min / median of 25 calls, with the caches flushed before each
   call (cold) and without (warm);
2. per call of the fused nodes' whole backward in 120 training steps (median, lower quartile);
3. the aten operations a step dispatches (torch.profiler, 10 steps), ``full`` and the policy:
   the per-step fixed cost, the same on every run whatever the machine's load.

A kernel the installed tinyprop does not have prints "-": to compare with older sources, run
the same command with ``PYTHONPATH=<their src>``, alternating.

Run:
    python benchmarks/fused_block.py
    python benchmarks/fused_block.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from speed import MODELS, keep_freed_memory, optimizer_for
from torch import nn
from torch.profiler import ProfilerActivity, profile

import tinyprop
from tinyprop import data, functional, native, pool_fusion

MODEL = "small CNN 16-32-32"


def captured_blocks(x, y, batch: int, policy: str) -> list[tuple]:
    """(grad, pooled, indices, shape) of each fused node's backward in the second step."""
    build, _, _, policies = MODELS[MODEL]
    captured, original = [], pool_fusion.PooledSparseBackprop.backward

    def capture(ctx, grad):
        _, _, pooled, indices = ctx.saved_tensors
        captured.append((grad.clone(), pooled.clone(), indices.clone(), ctx.input_shape))
        return original(ctx, grad)

    torch.manual_seed(0)
    model = tinyprop.apply(build(), policies[policy])
    optimizer = optimizer_for(policy, model)
    pool_fusion.PooledSparseBackprop.backward = staticmethod(capture)
    try:
        for step in range(2):
            captured.clear()
            rows = slice(step * batch, (step + 1) * batch)
            loss = nn.CrossEntropyLoss(reduction="none")
            tinyprop.train_step(model, x[rows], y[rows], loss, optimizer)
    finally:
        pool_fusion.PooledSparseBackprop.backward = original
    return captured


def milliseconds(function, cold: bool, flush: torch.Tensor, repeats: int = 25) -> str:
    """min / median process time of one call, in ms."""
    times = []
    for _ in range(repeats):
        if cold:
            flush.fill_(1.0)  # 16 MB written: δ and its inputs leave the caches
        start = time.process_time()
        function()
        times.append(1000 * (time.process_time() - start))
    return f"{min(times):.3f} / {statistics.median(times):.3f}"


def kernels_of(grad, pooled, indices, shape) -> tuple[int, int, dict]:
    """k, N and name -> a call of each kernel on one block's captured inputs."""
    batch, size = shape[0], shape[1] * shape[2] * shape[3]
    k = functional.fixed_keep_count(0.05, size)
    keep = torch.full((batch,), k)
    delta = native.relu_unpool(grad, pooled, indices, shape)
    flat = delta.reshape(batch, -1)  # (B, N)

    def unpool_then_topk():
        written = native.relu_unpool(grad, pooled, indices, shape).reshape(batch, -1)
        return native.topk(written, keep, with_rows=False, total=k * batch)

    return k, size, {
        "relu_unpool": lambda: native.relu_unpool(grad, pooled, indices, shape),
        "relu_unpool with sums": lambda: native.relu_unpool(grad, pooled, indices, shape, True),
        "|δ| sum (PyTorch)": lambda: functional.local_error(flat),
        "bias sum over δ (PyTorch)": lambda: delta.sum((0, 2, 3)),
        "top-k of the written δ": lambda: native.topk(flat, keep, with_rows=False, total=k * batch),
        "relu_unpool, then top-k": unpool_then_topk,
        "pooled top-k (δ not written)": lambda: native.pooled_topk(grad, pooled, indices, shape, k),
    }  # fmt: skip


def kernel_table(blocks: list[tuple]) -> None:
    flush = torch.empty(4 << 20)
    for grad, pooled, indices, shape in blocks:
        k, size, kernels = kernels_of(grad, pooled, indices, shape)
        print(f"\nblock {tuple(shape)}, k = {k} of {size}: ms, min / median (cold | warm)")
        for name, function in kernels.items():
            try:
                function()
            except (TypeError, AttributeError):  # not in these sources
                print(f"  {name:<30} -")
                continue
            cold, warm = (milliseconds(function, c, flush) for c in (True, False))
            print(f"  {name:<30} {cold:>15} | {warm:>15}")


def step_table(x, y, batch: int, policy: str, steps: int = 120) -> None:
    build, _, _, policies = MODELS[MODEL]
    original = pool_fusion.PooledSparseBackprop.backward
    spent: dict[int, list[float]] = {}

    def timed(ctx, grad):
        start = time.process_time()
        out = original(ctx, grad)
        spent.setdefault(ctx.input_shape[1], []).append(1000 * (time.process_time() - start))
        return out

    torch.manual_seed(0)
    model = tinyprop.apply(build(), policies[policy])
    optimizer = optimizer_for(policy, model)
    loss = nn.CrossEntropyLoss(reduction="none")
    step_times = []
    pool_fusion.PooledSparseBackprop.backward = staticmethod(timed)
    try:
        for step in range(10 + steps):
            rows = slice((step % 10) * batch, (step % 10 + 1) * batch)
            start = time.process_time()
            tinyprop.train_step(model, x[rows], y[rows], loss, optimizer)
            step_times.append(1000 * (time.process_time() - start))
            if step == 9:
                step_times.clear()
                spent.clear()
    finally:
        pool_fusion.PooledSparseBackprop.backward = original

    def quartiles(values):
        lower = sorted(values)[len(values) // 4]
        return f"{statistics.median(values):.2f} (lower quartile {lower:.2f})"

    print(f"\n{policy}, {steps} steps, ms of process time: step {quartiles(step_times)}")
    for channels, values in sorted(spent.items()):
        print(f"  fused backward of the block with {channels} channels: {quartiles(values)}")


def operation_counts(x, y, batch: int, policy: str) -> None:
    build, _, _, policies = MODELS[MODEL]
    counts = []
    for name in ("full", policy):
        torch.manual_seed(0)
        model = tinyprop.apply(build(), policies[name])
        optimizer = optimizer_for(name, model)
        loss = nn.CrossEntropyLoss(reduction="none")
        for _ in range(3):
            tinyprop.train_step(model, x[:batch], y[:batch], loss, optimizer)
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            for _ in range(10):
                tinyprop.train_step(model, x[:batch], y[:batch], loss, optimizer)
        events = profiler.key_averages()
        total = sum(event.count for event in events if event.key.startswith("aten::"))
        counts.append(f"{name} {total / 10:.0f}")
    print("\naten operations per step: " + ", ".join(counts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--policy", default="topk 0.05")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    _, batch, _, _ = MODELS[MODEL]
    x, y = data.load("mnist", "train", limit=batch * 10).tensors  # (N, 1, 28, 28)
    kernel_table(captured_blocks(x, y, batch, args.policy))
    step_table(x, y, batch, args.policy)
    operation_counts(x, y, batch, args.policy)


if __name__ == "__main__":
    main()
