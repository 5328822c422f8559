"""cProfile of training steps of one of ``benchmarks/speed.py``'s models: full's and a policy's
milliseconds per step, then the policy's 10 steps by function (where its time goes).

Run:
    python benchmarks/profile_step.py "wide MLP 784-2048-2048-10" --threads 1
    python benchmarks/profile_step.py "small CNN 16-32-32" --policy "topk 0.05" --threads 2
    python benchmarks/profile_step.py "wide MLP 784-2048-2048-10" --policy "topk 0.05 fused SGD"
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch
from speed import FUSED, MODELS, keep_freed_memory, optimizer_for, padded_mnist
from torch import nn

import tinyprop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", choices=list(MODELS))
    parser.add_argument("--policy", default="topk 0.05")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, default=25, help="functions listed")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    build, batch_size, side, policies = MODELS[args.model]
    x, y = padded_mnist(side, limit=batch_size * 10)  # (N, 1, side, side)
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    for name in ("full", args.policy):
        torch.manual_seed(0)
        model = tinyprop.apply(build(), policies[name])
        optimizer = optimizer_for(name, model)

        def train(index: int, model=model, optimizer=optimizer, fused=name in FUSED) -> None:
            batch = slice((index % 10) * batch_size, (index % 10 + 1) * batch_size)
            tinyprop.train_step(model, x[batch], y[batch], loss_fn, optimizer, fused_update=fused)

        for index in range(3):
            train(index)
        start = time.perf_counter()
        for index in range(10):
            train(index)
        print(f"{name}: {(time.perf_counter() - start) * 100:.1f} ms per step")
    profile = cProfile.Profile()
    profile.enable()
    for index in range(10):
        train(index)
    profile.disable()
    pstats.Stats(profile).sort_stats("tottime").print_stats(args.rows)


if __name__ == "__main__":
    main()
