"""The fixed cost of a sparse step: the deep MLP's layers at width 64, where the products cost
next to nothing, so what is left is the per-step and per-layer work around the kernels (the
Python path, small tensor operations, dispatch) that a step pays whatever its width.

Measured side by side (interleaved chunks of steps, one run): plain PyTorch (no tinyprop), the
``full`` policy, ``topk`` 0.05 and ``topk`` 0.05 with the fused SGD update; milliseconds per
step, the median and the lowest chunk. ``topk`` minus ``full`` is what the sparse path adds to
a step beyond its kernels' arithmetic; on the real deep MLP (``benchmarks/speed.py``) it adds
the same, a share of ``full``'s step there.

Run:
    python benchmarks/step_overhead.py
    python benchmarks/step_overhead.py --threads 2 --width 128
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from speed import FUSED_UPDATE, keep_freed_memory
from torch import nn

import tinyprop

SETTINGS = {
    "full": (tinyprop.TinyPropConfig(policy="full"), False),
    "topk 0.05": (tinyprop.TinyPropConfig(policy="topk", ratio=0.05), False),
    FUSED_UPDATE: (tinyprop.TinyPropConfig(policy="topk", ratio=0.05), True),
}


def narrow_deep_mlp(width: int) -> nn.Module:
    """speed.py's deep MLP (1024 inputs, three hidden layers, 10 outputs) at ``width``."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(1024, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, 10),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=40, help="timed chunks per setting")
    parser.add_argument("--chunk", type=int, default=10, help="steps per chunk")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    torch.manual_seed(0)
    base = narrow_deep_mlp(args.width)
    x, y = torch.randn(args.batch, 1024), torch.randint(0, 10, (args.batch,))
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    steps = {}
    plain = copy.deepcopy(base)
    plain_optimizer = torch.optim.SGD(plain.parameters(), lr=0.01)

    def plain_step() -> None:
        plain_optimizer.zero_grad(set_to_none=True)
        loss_fn(plain(x), y).mean().backward()
        plain_optimizer.step()

    steps["plain PyTorch"] = plain_step
    for name, (config, fused) in SETTINGS.items():
        model = tinyprop.apply(copy.deepcopy(base), config)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        steps[name] = lambda m=model, o=optimizer, f=fused: tinyprop.train_step(
            m, x, y, loss_fn, o, fused_update=f
        )
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(args.rounds + 1):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(args.chunk):
                step()
            if round_index:  # the first round warms up
                times[name].append(1000 * (time.perf_counter() - start) / args.chunk)
    print(
        f"deep MLP layers at width {args.width}, batch {args.batch}, {args.threads} thread(s),"
        " ms per step"
    )
    print("| setting | median | lowest chunk |\n|---|---:|---:|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.2f} | {min(values):.2f} |")


if __name__ == "__main__":
    main()
