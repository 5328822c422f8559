"""The tensor operations a training step dispatches, counted: a load-independent measure of the
per-step fixed cost that wall-clock timings on a shared machine cannot resolve.

torch.profiler counts the aten operations (nested ones included) of steps 20-60 of the bench's
har and mnist finetune runs (``tinypropv2`` with the bench's setting, and ``full``; most of
those steps train a few samples) and of 20 steps of ``benchmarks/step_overhead.py``'s model
(the deep MLP's layers at width 64, batch 64, SGD: ``full`` and ``topk`` 0.05), and of 10 steps
of the speed benchmark's MLPs (wide, batch 128, and deep, batch 64, on random inputs: ``full``,
``topk`` 0.05 and ``tinypropv2``). Each operation
costs a few microseconds of dispatch whatever its size, so at these sizes fewer operations is
a faster step; the count is the same on every run.

Run:
    python benchmarks/step_operations.py
"""

from __future__ import annotations

import copy

import torch
from speed import deep_mlp, wide_mlp
from speed_floor import finetune_workload
from step_overhead import narrow_deep_mlp
from torch import nn
from torch.profiler import ProfilerActivity, profile

import tinyprop


def operations(function, calls: list[tuple]) -> float:
    """aten operations per call of ``function(*arguments)`` over ``calls``."""
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for arguments in calls:
            function(*arguments)
    events = profiler.key_averages()
    return sum(event.count for event in events if event.key.startswith("aten::")) / len(calls)


def finetune_counts(dataset: str) -> dict[str, float]:
    """Operations per step of the finetune run's steps 20-60, full and tinypropv2."""
    workload = finetune_workload(dataset)
    counts = {}
    configs = {"full": tinyprop.TinyPropConfig(policy="full"), "tinypropv2": workload["policy"][1]}
    for label, config in configs.items():
        model = tinyprop.apply(copy.deepcopy(workload["model"]), config)
        optimizer = workload["optimizer"](model)

        def step(x, y, model=model, optimizer=optimizer):
            tinyprop.train_step(model, x, y, workload["loss"], optimizer)

        for x, y in workload["batches"][:20]:  # the run's state as it is at step 20
            step(x, y)
        counts[label] = operations(step, workload["batches"][20:60])
    return counts


def narrow_counts() -> dict[str, float]:
    """Operations per step of the width-64 deep MLP, full and topk 0.05."""
    torch.manual_seed(0)
    base = narrow_deep_mlp(64)
    x, y = torch.randn(64, 1024), torch.randint(0, 10, (64,))
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    counts = {}
    for label, config in (
        ("full", tinyprop.TinyPropConfig(policy="full")),
        ("topk 0.05", tinyprop.TinyPropConfig(policy="topk", ratio=0.05)),
    ):
        model = tinyprop.apply(copy.deepcopy(base), config)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

        def step(model=model, optimizer=optimizer):
            tinyprop.train_step(model, x, y, loss_fn, optimizer)

        for _ in range(5):
            step()
        counts[label] = operations(step, [()] * 20)
    return counts


def mlp_counts(build, batch: int, inputs: int) -> dict[str, float]:
    """Operations per step of one of speed.py's MLPs, full, topk 0.05 and tinypropv2."""
    torch.manual_seed(0)
    base = build()
    x, y = torch.randn(batch, inputs), torch.randint(0, 10, (batch,))
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    counts = {}
    for label, config in (
        ("full", tinyprop.TinyPropConfig(policy="full")),
        ("topk 0.05", tinyprop.TinyPropConfig(policy="topk", ratio=0.05)),
        ("tinypropv2", tinyprop.TinyPropConfig(policy="tinypropv2")),
    ):
        model = tinyprop.apply(copy.deepcopy(base), config)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

        def step(model=model, optimizer=optimizer):
            tinyprop.train_step(model, x, y, loss_fn, optimizer)

        for _ in range(3):
            step()
        counts[label] = operations(step, [()] * 10)
    return counts


def main() -> None:
    torch.set_num_threads(1)
    print("aten operations per training step (torch.profiler, one thread)")
    print("| workload | full | sparse |")
    print("|---|---:|---:|")
    for dataset in ("mnist", "har"):
        counts = finetune_counts(dataset)
        print(f"| {dataset} finetune, steps 20-60 | {counts['full']:.0f} | "
              f"{counts['tinypropv2']:.0f} (tinypropv2) |")  # fmt: skip
    counts = narrow_counts()
    print(f"| deep MLP layers at width 64 | {counts['full']:.0f} | "
          f"{counts['topk 0.05']:.0f} (topk 0.05) |")  # fmt: skip
    for name, build, batch, inputs in (
        ("wide MLP 784-2048-2048-10, batch 128", wide_mlp, 128, 784),
        ("deep MLP 1024-2048-2048-2048-10, batch 64", deep_mlp, 64, 1024),
    ):
        counts = mlp_counts(build, batch, inputs)
        print(f"| {name} | {counts['full']:.0f} | {counts['topk 0.05']:.0f} (topk 0.05), "
              f"{counts['tinypropv2']:.0f} (tinypropv2) |")  # fmt: skip


if __name__ == "__main__":
    main()
