"""The memory floor under an MLP's sparse step: what a `topk` step must still do, timed alone.

A sparse step keeps the forward and the loss of every sample and the user's optimizer step
(SGD over every weight); its backward must at least write each weight gradient W' (``.grad``
is a dense tensor users read: nearly every row of it is non-zero at batch 128 and 5 % per
sample) and read each weight whose input gradient it computes. Those parts are timed here on
their own, side by side with ``full``'s step (interleaved chunks, medians):

    memory floor = (forward + loss + optimizer + write W' + read W) / full

What a step measures above that is selection, the sparse products' arithmetic and
bookkeeping. Unlike ``speed_floor.py`` (the backward's MAC share at dense speed) this floor
needs no assumption about the kernels: no backward that fills ``.grad`` can go under it here.

Run:
    python benchmarks/memory_floor.py                       # both MLPs, torch's default threads
    python benchmarks/memory_floor.py --threads 1 --models "deep MLP 1024-2048-2048-2048-10"
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from speed import MODELS, keep_freed_memory, padded_mnist
from torch import nn

import tinyprop

MLPS = [name for name in MODELS if "MLP" in name]


def parts(name: str) -> dict:
    """label -> function running that part of a step of ``name``'s model at its batch size."""
    build, batch_size, side, _ = MODELS[name]
    x, y = padded_mnist(side, batch_size)  # (B, 1, side, side), (B,)
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    torch.manual_seed(0)
    model = build()
    full = tinyprop.apply(build(), tinyprop.TinyPropConfig(policy="full"))
    full_optimizer = torch.optim.SGD(full.parameters(), lr=0.01)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for parameter in model.parameters():  # the optimizer's input, without any backward
        parameter.grad = torch.zeros_like(parameter)
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]  # (out, in)
    propagated = weights[1:]  # the first layer's input gradient is not needed

    def forward_and_loss():
        loss_fn(model(x), y).mean()

    def write_gradients():
        for weight in weights:
            weight.grad.zero_()  # one write of every element

    def read_weights():
        for weight in propagated:
            weight.sum()  # one read of every element

    return {
        "full": lambda: tinyprop.train_step(full, x, y, loss_fn, full_optimizer),
        "forward + loss": forward_and_loss,
        "optimizer": optimizer.step,
        "write W'": write_gradients,
        "read W": read_weights,
    }


def measure(name: str, rounds: int, chunk: int) -> dict[str, float]:
    """Milliseconds per call of each part: the median of ``rounds`` interleaved chunks."""
    functions = parts(name)
    times: dict[str, list[float]] = {label: [] for label in functions}
    for round_index in range(rounds + 1):  # round 0 warms up, untimed
        for label, function in functions.items():
            start = time.perf_counter()
            for _ in range(chunk):
                function()
            if round_index:
                times[label].append(1000 * (time.perf_counter() - start) / chunk)
    return {label: statistics.median(values) for label, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=MLPS, default=MLPS)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--chunk", type=int, default=5, help="calls per timed chunk")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()
    print(f"{torch.get_num_threads()} torch threads, ms per step (median of {args.rounds} chunks)")
    print("| model | full | forward + loss | optimizer | write W' | read W | memory floor |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in args.models:
        ms = measure(name, args.rounds, args.chunk)
        floor = sum(value for label, value in ms.items() if label != "full") / ms["full"]
        cells = " | ".join(f"{value:.2f}" for value in ms.values())
        print(f"| {name} | {cells} | {floor:.2f} |", flush=True)


if __name__ == "__main__":
    main()
