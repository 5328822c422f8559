"""What the one walk (``native.linear_input_update``) is worth in a fused SGD step: the library's
``train_step(fused_update=True)`` against the same step without it, in one process.

Three ways to run the step of the same MLP (same initial weights, same batches): ``walk``, the
library's (a graph-free step proven accepted before its backward steps each fused hidden
layer's weight in its input-gradient walk, :mod:`tinyprop.fused_walk`); ``deferred``, the
graph-free step with the proof switched off (every fused update after the step's check); and
``autograd``, the step through the autograd graph, as ``train_step(fused_update=True)`` ran
before the graph-free step took fused updates (deferred too). Chunks of steps of each are
alternated; the script prints milliseconds per step (median and least of the chunks), the
median of the paired ratios against ``walk`` and whether the weights (and momentum buffers)
came out equal (they must: the same sums in the same order).

Run:
    python benchmarks/fused_walk_ab.py --model deep
    python benchmarks/fused_walk_ab.py --model wide --threads 2 --clock wall --momentum 0.9
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from unittest import mock

import torch
from torch import nn

import tinyprop
from tinyprop import fused_walk, graph_free

LR = 0.01
SIZES = {"wide": ([784, 2048, 2048, 10], 128), "deep": ([1024, 2048, 2048, 2048, 10], 64)}
WAYS = ("walk", "deferred", "autograd")


def mlp(sizes: list[int], momentum: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    layers = []
    for index, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
        layers += [nn.Linear(fan_in, fan_out)] + ([nn.ReLU()] if index < len(sizes) - 2 else [])
    model = tinyprop.apply(
        nn.Sequential(*layers), tinyprop.TinyPropConfig(policy="topk", ratio=0.05)
    )
    return model, torch.optim.SGD(model.parameters(), lr=LR, momentum=momentum)


def way(name: str) -> contextlib.AbstractContextManager:
    """The patch that makes the library's step run ``name``'s way."""
    if name == "deferred":
        return mock.patch.object(fused_walk, "prove", return_value=None)
    if name == "autograd":
        return mock.patch.object(graph_free, "eligible", return_value=False)
    return contextlib.nullcontext()


def equal_state(a: tuple, b: tuple) -> bool:
    """Whether two (model, optimizer) pairs hold the same weights and momentum buffers."""
    (model_a, optimizer_a), (model_b, optimizer_b) = a, b
    pairs = list(zip(model_a.parameters(), model_b.parameters(), strict=True))
    buffers = [
        (optimizer_a.state[p].get("momentum_buffer"), optimizer_b.state[q].get("momentum_buffer"))
        for p, q in pairs
    ]
    return all(torch.equal(p, q) for p, q in pairs) and all(
        (u is None and v is None) or (u is not None and v is not None and torch.equal(u, v))
        for u, v in buffers
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=list(SIZES), default="deep")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=5, help="steps per timed chunk")
    parser.add_argument("--clock", choices=["process", "wall"], default="process")
    parser.add_argument("--momentum", type=float, default=0.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "process" else time.perf_counter
    sizes, batch = SIZES[args.model]
    models = {name: mlp(sizes, args.momentum) for name in WAYS}
    generator = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(batch, sizes[0], generator=generator), torch.randint(0, 10, (batch,)))
        for _ in range(8)
    ]
    loss = nn.CrossEntropyLoss(reduction="none")
    steps = dict.fromkeys(WAYS, 0)

    def run(name: str, count: int) -> float:
        model, optimizer = models[name]
        with way(name):
            start = clock()
            for _ in range(count):
                x, y = batches[steps[name] % len(batches)]
                steps[name] += 1
                tinyprop.train_step(model, x, y, loss, optimizer, fused_update=True)
            return 1e3 * (clock() - start) / count

    times = {name: [] for name in WAYS}
    for index in range(args.rounds + 1):  # the first round warms up
        order = WAYS[index % 3 :] + WAYS[: index % 3]
        for name in order:
            milliseconds = run(name, args.chunk)
            if index:
                times[name].append(milliseconds)
    parts = [
        f"{args.model} MLP topk 0.05 fused SGD (momentum {args.momentum:g}), {args.threads} "
        f"thread(s), {args.clock} time, ms per step"
    ]
    for name in WAYS:
        parts.append(f"{name} {statistics.median(times[name]):.2f} (least {min(times[name]):.2f})")
    for name in WAYS[1:]:
        ratios = [new / old for new, old in zip(times["walk"], times[name], strict=True)]
        same = equal_state(models["walk"], models[name])
        parts.append(
            f"walk / {name} median of pairs {statistics.median(ratios):.3f}, equal: {same}"
        )
    print("; ".join(parts))


if __name__ == "__main__":
    main()
