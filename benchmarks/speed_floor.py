"""The floor under each wall-clock target: the lowest step-time ratio a sparse step can reach.

A sparse step still runs the forward and the loss of every sample, and the user's optimizer
still updates every parameter; only the backward shrinks. Measured side by side (interleaved
chunks of steps, one run, as ``benchmarks/speed.py``): the ``full`` step, the forward + loss
alone, the optimizer step alone (on gradients already there, no backward at all). The dense
backward is the rest of the full step. If the sparse backward ran at dense throughput, the step
would cost

    floor = (forward + loss + s · optimizer + r · dense backward) / full

with r the policy's backward-vs-full MAC ratio (the ledger's, selection included) and s the
share of its steps that ran the optimizer (a step that skips every sample does not). A target
below its floor cannot be met on this machine at that batch size, whatever the kernels do.
Beside the floor: the policy's own step ratio, measured in the same rounds.

Run:
    python benchmarks/speed_floor.py              # writes benchmarks/results/speed_floor.json
    python benchmarks/speed_floor.py --threads 1 --workloads "finetune har"
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from finetune_speed import SETTINGS
from speed import (
    MODELS,
    POLICIES,
    add_timing_arguments,
    commit,
    keep_freed_memory,
    write_record,
)
from torch import nn

import tinyprop
from tinyprop import data
from tinyprop.bench import runner, suites, training
from tinyprop.model import state_of
from tinyprop.optim import make_optimizer

TARGETS = {  # issue 13's acceptance: policy step (or run) time over full's
    "wide MLP 784-2048-2048-10": 0.45,
    "deep MLP 1024-2048-2048-2048-10": 0.5,
    "small CNN 16-32-32": 0.8,
    "MobileNet-style CNN": 0.9,
    "finetune har": 0.6,
    "finetune mnist": 0.6,
}


def speed_workload(name: str, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """One of speed.py's models at its batch size, SGD, ``topk`` 0.05."""
    build, batch_size, side, _ = MODELS[name]
    pad = (side - images.shape[-1]) // 2
    x = nn.functional.pad(images, (pad,) * 4) if pad else images  # (N, 1, side, side)
    batches = [
        (x[start : start + batch_size], labels[start : start + batch_size])
        for start in range(0, len(x) - batch_size + 1, batch_size)
    ]
    torch.manual_seed(0)
    return {
        "model": build(),
        "batches": batches,
        "optimizer": lambda model: torch.optim.SGD(model.parameters(), lr=0.01),
        "loss": nn.CrossEntropyLoss(reduction="none"),
        "policy": ("topk 0.05", POLICIES["topk 0.05"]),
    }


def finetune_workload(dataset: str) -> dict:
    """The bench's finetune run (small suite, seed 0): pretrained model, its batches in order,
    its optimizer, ``tinypropv2`` with the bench's setting."""
    policy, settings = SETTINGS["tinypropv2"]
    (spec,) = runner.plan_runs(
        suites.get("small"), "finetune", "/nonexistent", datasets=[dataset],
        policies=[policy], seeds=[0], max_settings=1,
    )  # fmt: skip
    pretrained = runner.pretrained_state(spec)
    pool, _, splits, _, model = runner.prepare(spec)
    model.load_state_dict(pretrained)
    x, y = pool.x[splits.train], pool.y[splits.train]
    plan = spec.plan
    order = training.batches(len(x), plan.batch_size, plan.epochs, spec.seed + 2000)
    return {
        "model": model,
        "batches": [(x[index], y[index]) for _, index in order],
        "optimizer": lambda model: make_optimizer("adam", model, plan.lr),
        "loss": training.per_sample_cross_entropy,
        "policy": ("tinypropv2", tinyprop.TinyPropConfig(policy=policy, seed=0, **settings)),
    }


def step_functions(workload: dict) -> tuple[dict, dict]:
    """label -> function(x, y) running one step of it, each on its own copy of the model;
    and the policy's counters (ledger, optimizer steps)."""
    loss_fn, make = workload["loss"], workload["optimizer"]
    full = tinyprop.apply(copy.deepcopy(workload["model"]), tinyprop.TinyPropConfig(policy="full"))
    full_optimizer = make(full)
    plain = tinyprop.apply(copy.deepcopy(workload["model"]), tinyprop.TinyPropConfig(policy="full"))
    plain_optimizer = make(plain)
    for parameter in plain.parameters():  # the optimizer's input, without any backward
        parameter.grad = torch.zeros_like(parameter)
    label, config = workload["policy"]
    sparse = tinyprop.apply(copy.deepcopy(workload["model"]), config)
    sparse_optimizer = make(sparse)
    counters = {"ledger": tinyprop.Ledger(), "steps": 0, "stepped": 0}

    def forward_and_loss(x, y):
        loss_fn(plain(x), y).mean()
        state_of(plain).take_passes()  # the ledger's record of the forward, dropped

    def policy_step(x, y):
        stats = tinyprop.train_step(sparse, x, y, loss_fn, sparse_optimizer)
        counters["ledger"] += stats.macs
        counters["steps"] += 1
        counters["stepped"] += stats.stepped

    functions = {
        "full": lambda x, y: tinyprop.train_step(full, x, y, loss_fn, full_optimizer),
        "forward + loss": forward_and_loss,
        "optimizer": lambda x, y: plain_optimizer.step(),
        label: policy_step,
    }
    return functions, counters


def measure(workload: dict, rounds: int, chunk: int) -> dict:
    """Per-step times of every function, interleaved in chunks (one untimed chunk each first),
    each round's ratio to full's chunk of the same round; the floor from the medians."""
    functions, counters = step_functions(workload)
    batches = workload["batches"]
    times: dict[str, list[float]] = {label: [] for label in functions}
    for round_index in range(rounds + 1):
        if round_index == 1:  # the policy's counters cover the timed steps only
            counters.update(ledger=tinyprop.Ledger(), steps=0, stepped=0)
        for label, function in functions.items():
            start = time.perf_counter()
            for step in range(round_index * chunk, (round_index + 1) * chunk):
                function(*batches[step % len(batches)])
            if round_index:
                times[label].append((time.perf_counter() - start) / chunk)
    ms = {label: 1000 * statistics.median(values) for label, values in times.items()}
    policy = workload["policy"][0]
    full = ms["full"]
    dense_backward = full - ms["forward + loss"] - ms["optimizer"]
    backward_ratio = counters["ledger"].backward_ratio()
    stepped = counters["stepped"] / counters["steps"]
    floor_ms = ms["forward + loss"] + stepped * ms["optimizer"] + backward_ratio * dense_backward
    ratios = [p / f for p, f in zip(times[policy], times["full"], strict=True)]
    return {
        "batch_size": len(batches[0][0]),
        "policy": policy,
        "ms_full": full,
        "ms_forward_and_loss": ms["forward + loss"],
        "ms_optimizer": ms["optimizer"],
        "ms_dense_backward": dense_backward,
        "backward_mac_ratio": backward_ratio,
        "stepped_share": stepped,
        "floor": floor_ms / full,
        "measured": statistics.median(ratios),
        "measured_spread": [min(ratios), max(ratios)],
    }


HEADER = (
    "| workload                        | batch | full ms | fwd+loss | optimizer | dense bwd "
    "| r     | floor | measured (policy)         | target |\n|---------------------------------|"
    "-------|---------|----------|-----------|-----------|-------|-------|-----------------"
    "----------|--------|"
)


def row(name: str, result: dict, target: float) -> str:
    """One table row; the target says 'blocked' when the floor is above it."""
    measured = "{:.2f} ({:.2f}-{:.2f}) {}".format(
        result["measured"], *result["measured_spread"], result["policy"]
    )
    verdict = ""
    if result["floor"] > target:
        verdict = "blocked"  # even a backward at dense throughput cannot reach the target
    elif result["measured"] <= target:
        verdict = "met"
    return (
        f"| {name:<31} | {result['batch_size']:>5} | {result['ms_full']:>7.2f} | "
        f"{result['ms_forward_and_loss']:>8.2f} | {result['ms_optimizer']:>9.2f} | "
        f"{result['ms_dense_backward']:>9.2f} | {result['backward_mac_ratio']:.3f} | "
        f"{result['floor']:>5.2f} | {measured:<25} | {target:.2f} {verdict}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_timing_arguments(parser)  # a finetune run: one pass over its steps in --rounds chunks
    parser.add_argument("--workloads", nargs="+", choices=list(TARGETS), default=list(TARGETS))
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "speed_floor.json")
    )
    args = parser.parse_args()
    start_load = os.getloadavg()[0]
    keep_freed_memory()
    largest_batch = max(MODELS[name][1] for name in MODELS)
    images, labels = data.load(
        "mnist", "train", limit=largest_batch * (args.rounds + 1) * args.chunk
    ).tensors  # (N, 1, 28, 28)
    record = {
        "command": "python " + " ".join(sys.argv),
        "commit": commit(),
        "default_threads": torch.get_num_threads(),
        "threads": {},
    }
    for threads in args.threads:
        torch.set_num_threads(threads)
        record["threads"][str(threads)] = results = {}
        print(f"\n{threads} torch threads")
        print(HEADER)
        for name in args.workloads:
            if name.startswith("finetune "):
                workload = finetune_workload(name.split()[1])
                torch.set_num_threads(threads)  # the bench's loaders set one thread
                # one pass over the run's batches in `rounds` chunks, after one warm-up chunk
                chunk = -(-len(workload["batches"]) // args.rounds)
            else:
                workload, chunk = speed_workload(name, images, labels), args.chunk
            results[name] = measure(workload, args.rounds, chunk)
            results[name]["target"] = TARGETS[name]
            print(row(name, results[name], TARGETS[name]), flush=True)
    write_record(record, args.out, start_load)


if __name__ == "__main__":
    main()
