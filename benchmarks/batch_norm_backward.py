"""BatchNorm's backward inside a training step, layer by layer: ``full`` against a sparse
policy, and what changes it.

In a MobileNet-style ``topk`` 0.05 step the BatchNorm layers' backward costs 1-1.5 ms more
than in ``full``'s (docs/speed.md, "The convolutions"), although both receive a contiguous
(B, C, H, W) float32 δ of the same size and run the same PyTorch kernel. Here several models
train side by side (same initial weights, same batches, interleaved in chunks of 5 steps) and
every ``NativeBatchNormBackward0`` node is timed (hooks on the node). A variant changes what
the node receives or the state it runs in, in a pre-hook (not timed):

- ``touch``: δ and BatchNorm's saved input read once first (both in the cache);
- ``clone``: δ replaced by a fresh copy (the same values in other, just written memory);
- ``again``: BatchNorm's own backward run once first on the same inputs, its result dropped
  (δ and the input in the cache, and the allocator just freed a gradient of the input's size,
  written a moment ago: the timed call's fresh gradient most likely lands there);
- ``flush``: subnormal floats flushed to zero for the whole step (``torch.set_flush_denormal``).

Median per layer call; process time of the one thread at ``--threads 1``, else wall time.

Run:
    python benchmarks/batch_norm_backward.py
    python benchmarks/batch_norm_backward.py --variants touch clone again flush --rounds 12
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import time

import torch
from speed import MODELS, POLICIES, keep_freed_memory, padded_mnist
from torch import nn

import tinyprop


def touch(grad_outputs, node):
    """δ and the saved input read once (both in the cache), nothing replaced."""
    grad_outputs[0].sum()
    node._saved_input.sum()


def clone(grad_outputs, node):
    """δ replaced by a fresh copy: the same values, other memory, just written."""
    return (grad_outputs[0].clone(),)


def again(grad_outputs, node):
    """BatchNorm's backward of the node run once on the same inputs, its result dropped."""
    torch.ops.aten.native_batch_norm_backward(
        grad_outputs[0], node._saved_input, node._saved_weight, node._saved_running_mean,
        node._saved_running_var, node._saved_result1, node._saved_result2,
        node._saved_training, node._saved_eps, [True, True, True],
    )  # fmt: skip


VARIANTS = {"touch": touch, "clone": clone, "again": again, "flush": None}


class BatchNormClock:
    """Times every BatchNorm backward node of a model's steps, per BatchNorm module name."""

    def __init__(self, model: nn.Module, clock, before=None):
        self.clock, self.before = clock, before
        self.times: dict[str, list[float]] = collections.defaultdict(list)
        self.names = {
            id(module.weight): name
            for name, module in model.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.weight is not None
        }
        last = list(model.modules())[-1]  # the graph is hooked once the forward is done
        last.register_forward_hook(lambda module, inputs, output: self.hook_graph(output))

    def hook_graph(self, output: torch.Tensor) -> None:
        seen, stack = set(), [output.grad_fn]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            stack.extend(child for child, _ in node.next_functions)
            if node.name() != "NativeBatchNormBackward0":
                continue
            name = next(
                self.names[id(child.variable)]
                for child, _ in node.next_functions
                if id(getattr(child, "variable", None)) in self.names
            )
            started = []

            def before(grad_outputs, node=node, started=started):
                replaced = self.before(grad_outputs, node) if self.before else None
                started.append(self.clock())
                return replaced

            def after(grad_inputs, grad_outputs, name=name, started=started):
                self.times[name].append(self.clock() - started.pop())

            node.register_prehook(before)
            node.register_hook(after)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", default="MobileNet-style CNN", choices=list(MODELS))
    parser.add_argument(
        "--policy", default="topk 0.05", choices=[p for p in POLICIES if p != "full"]
    )
    parser.add_argument("--variants", nargs="*", default=["touch"], choices=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=10, help="chunks of 5 steps per model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    build, batch_size, side, _ = MODELS[args.model]
    x, y = padded_mnist(side, limit=batch_size * 10)  # (N, 1, side, side)
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    runs = {}  # column -> (model, optimizer, clock, flush)
    for variant in [None, *args.variants]:
        for policy in ("full", args.policy):
            torch.manual_seed(0)
            model = tinyprop.apply(build(), POLICIES[policy])
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
            timer = BatchNormClock(model, clock, VARIANTS[variant] if variant else None)
            column = policy if variant is None else f"{policy} {variant}"
            runs[column] = (model, optimizer, timer, variant == "flush")
    load = os.getloadavg()[0]
    for round_index in range(args.rounds + 1):
        for model, optimizer, timer, flush in runs.values():
            if round_index == 1:  # the first chunk warms up
                timer.times.clear()
            torch.set_flush_denormal(flush)
            for index in range(5):
                rows = slice(index * batch_size, (index + 1) * batch_size)
                tinyprop.train_step(model, x[rows], y[rows], loss_fn, optimizer)
            torch.set_flush_denormal(False)
    unit = "process time" if args.threads == 1 else "wall time"
    print(f"{args.model}, {args.threads} thread(s), BatchNorm backward, ms per call ({unit}, "
          f"median), load average {load:.2f} -> {os.getloadavg()[0]:.2f}")  # fmt: skip
    print("| BatchNorm | " + " | ".join(runs) + " |")
    print("|---|" + "---:|" * len(runs))
    names = list(next(iter(runs.values()))[2].times)  # backward order
    totals = collections.Counter()
    for name in names:
        cells = []
        for column, (_, _, timer, _) in runs.items():
            median = statistics.median(timer.times[name]) * 1e3
            totals[column] += median
            cells.append(f"{median:.3f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("| all | " + " | ".join(f"{totals[column]:.2f}" for column in runs) + " |")


if __name__ == "__main__":
    main()
