"""Σ |δ| and the top-k selection of one training step's layer calls: two PyTorch passes over δ
(a copy of |δ|, its sum) then the native selection, against the native selection that sums
|δ| from the same read of each row (``tinyprop.native.topk_with_sums``, which fixed-ratio
top-k takes on the native convolution path).

Every layer call's δ and k of a ``topk`` 0.05 step of one of ``benchmarks/speed.py``'s models
are captured, then both ways are timed on each, alternated in one process, with δ evicted
from the caches before each call (in a step δ was written by the layer after it, a
BatchNorm's backward, and no longer fits the caches): the sum over the layer calls of each
way's median and least wall time.

Run:
    python benchmarks/selection_passes.py "MobileNet-style CNN"
    python benchmarks/selection_passes.py "small CNN 16-32-32" --threads 2 --rounds 50
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from layer_kernels import captured_calls
from speed import MODELS, keep_freed_memory

from tinyprop import native
from tinyprop.functional import local_error


def separate(flat: torch.Tensor, keep: torch.Tensor) -> None:
    """Σ |δ| by PyTorch (read on the host, as the step does), then the native selection."""
    local_error(flat).tolist()
    native.topk(flat, keep, with_rows=False)


def summed(flat: torch.Tensor, keep: torch.Tensor) -> None:
    """Both from one read of each row."""
    native.topk_with_sums(flat, int(keep[0]))[0].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", choices=list(MODELS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    calls, _ = captured_calls(args.model)
    # the layer calls with a fixed k and a row of δ each (not the output layer's)
    captured = [(call[4].contiguous(), call[5]) for call in calls if call[4].shape[1] > 16]
    evict = torch.empty(64 << 20, dtype=torch.uint8)  # larger than the last-level cache
    ways = {"separate": separate, "summed": summed}
    times = {name: [[] for _ in captured] for name in ways}
    for round_index in range(args.rounds):
        order = list(ways) if round_index % 2 else list(ways)[::-1]
        for index, (flat, keep) in enumerate(captured):
            for name in order:
                evict.add_(1)
                start = time.perf_counter()
                ways[name](flat, keep)
                times[name][index].append(time.perf_counter() - start)
    print(
        f"{args.model}, topk 0.05, {len(captured)} layer calls, {args.threads} thread(s), "
        f"{args.rounds} rounds, δ evicted from the caches before each call, ms per step"
    )
    for name, per_call in times.items():
        median = 1000 * sum(statistics.median(call) for call in per_call)
        least = 1000 * sum(min(call) for call in per_call)
        print(f"{name:>9}: sum of medians {median:.3f}, sum of least {least:.3f}")


if __name__ == "__main__":
    main()
