"""Where a whole fine-tuning run's tinypropv2 steps spend their time, function by function:
the thread time (``time.thread_time_ns``, one torch thread) of each of ``train_step``'s parts
per step, over whole runs (every batch of the run once, from the pretrained weights, a fresh
model each run) as the bench runs them, beside the hand-written step's floor
(``finetune_floor.py``).

Each timed function is wrapped while the runs go (a wrapper adds about a microsecond a call,
and the nested parts are inside their callers' times: the sparse layers' backward includes
the kernels, ``_open_step`` the decision). A part's time in the run is often 2-4x what the
same call costs in a loop of its own: the step's tensors, Adam's moments and the kernels push
the bookkeeping's code and data out of the caches between steps, so whichever part comes
first after them pays for it (``z.mean()`` of a fixed 8-float tensor costs 4 µs in a loop,
15-25 µs as the first operation after the forward's convolutions or after Adam).

Run:
    python benchmarks/step_functions.py                       # har, 20 whole runs
    python benchmarks/step_functions.py --dataset mnist --runs 3
"""

from __future__ import annotations

import argparse
import collections
import copy
import os
import time

import torch
from speed_floor import finetune_workload

import tinyprop
from tinyprop import autograd, graph_free, step, trainer

# (module or class, function name, label): the parts of train_step timed
PARTS = [
    (trainer, "zero_gradients", "zero the gradients"),
    (trainer, "check_optimizer_holds_the_model", "optimizer check"),
    (graph_free, "eligible", "graph-free eligibility"),
    (graph_free, "_forward", "forward (with its records)"),
    (graph_free, "_reaches_only", "loss graph walk"),
    (graph_free, "_open_step", "decision (whole)"),
    (step, "_output_error", "decision: Y_L and the loss gradient"),
    (step.StepContext, "__init__", "decision: StepContext"),
    (graph_free, "_output_error", "δ_L of the trained rows"),
    (graph_free, "_layer_backward", "sparse layers' backward (whole)"),
    (autograd, "_gradients", "sparse layers: selection and kernels"),
    (autograd, "few_rows", "sparse layers: few rows' Y_l, Ymax_l, k"),
    (autograd, "list_tensor", "sparse layers: tensors of rows and k"),
    (step.StepContext, "prove_finite", "sparse layers: finiteness bounds"),
    (graph_free, "module_backward", "ReLU, pools, Flatten backward"),
    (step.StepContext, "finish", "records and ledger"),
    (trainer, "check_gradients", "gradient check"),
    (step.StepContext, "commit", "running state written"),
    (torch.optim.Adam, "step", "Adam"),
]


def timed(function, label: str, seconds: collections.Counter, calls: collections.Counter):
    def wrapper(*args, **kwargs):
        start = time.thread_time_ns()
        try:
            return function(*args, **kwargs)
        finally:
            seconds[label] += time.thread_time_ns() - start
            calls[label] += 1

    return wrapper


def measure(dataset: str, runs: int) -> None:
    """Thread time per step of each part over ``runs`` whole tinypropv2 runs."""
    workload = finetune_workload(dataset)
    seconds: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in PARTS]
    for owner, name, label in PARTS:
        setattr(owner, name, timed(getattr(owner, name), label, seconds, calls))
    total = steps = 0
    try:
        for _ in range(runs):
            model = tinyprop.apply(copy.deepcopy(workload["model"]), workload["policy"][1])
            optimizer = workload["optimizer"](model)
            for x, y in workload["batches"]:
                start = time.thread_time_ns()
                trainer.train_step(model, x, y, workload["loss"], optimizer)
                total += time.thread_time_ns() - start
                steps += 1
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)
    per_step = total / steps / 1e3
    print(f"{dataset} finetune, tinypropv2, {runs} whole runs of {steps // runs} steps: "
          f"{per_step:.0f} µs a step (thread time, one thread, wrappers included)")  # fmt: skip
    print("| part of train_step | µs a step | share | calls a step |")
    print("|---|---:|---:|---:|")
    for _, _, label in PARTS:
        if calls[label]:
            share = 100 * seconds[label] / total
            print(f"| {label} | {seconds[label] / steps / 1e3:.1f} | {share:.1f}% | "
                  f"{calls[label] / steps:.2f} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="har", choices=["har", "mnist"])
    parser.add_argument("--runs", type=int, default=20, help="whole runs timed")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the bench runs
    start_load = os.getloadavg()[0]
    measure(args.dataset, args.runs)
    print(f"load average {start_load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
