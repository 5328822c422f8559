"""Where a training step's backward goes, node by node, in the step itself: ``full`` against a
sparse policy, layer by layer.

``layer_kernels.py`` times each layer call's kernels alone, on captured inputs, warm in the
cache; inside a step they read δ and the input after the forward and the BatchNorm backward
and cost more. Here both policies train one of ``benchmarks/speed.py``'s models (same initial
weights, same batches), interleaved in chunks of 5 steps, and every autograd node of every
step is timed (hooks on the nodes: a few microseconds each, both policies alike): per layer,
``full``'s convolution / linear backward (PyTorch's kernels) beside the sparse layer's node
(:class:`tinyprop.autograd.SparseBackprop`: selection, kernel and the rest), and the nodes
both policies run (BatchNorm, ReLU, ...). The sparse node is split by the native calls it
makes: selection (top-k with Σ |δ|), kernel (the convolution / linear kernels), layout (the
channels-last copy of a convolution's input); "rest" is the Python and tensor operations
around them. Median per step over the steps; process time of the one thread at
``--threads 1``, else wall time (noisy on a shared machine: read the load beside it).

Run:
    python benchmarks/backward_nodes.py "MobileNet-style CNN"
    python benchmarks/backward_nodes.py "small CNN 16-32-32" --threads 2 --rounds 10
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import statistics
import time

import torch
from speed import MODELS, POLICIES, keep_freed_memory, padded_mnist
from torch import nn

import tinyprop
from tinyprop import native

# the native calls of a sparse layer's backward, by what they do
PARTS = {
    "topk_with_sums": "selection",
    "topk": "selection",
    "conv_backward": "kernel",
    "plane_conv_backward": "kernel",
    "linear_backward": "kernel",
    "channels_last": "layout",
}
LAYER_NODES = ("ConvolutionBackward0", "AddmmBackward0", "MmBackward0", "SparseBackpropBackward")


class NodeClock:
    """Times every autograd node of the graphs it is given (per step: node -> seconds), and the
    native calls made while a node runs (per step: (node, part) -> seconds)."""

    def __init__(self, clock, names: dict[int, str]):
        self.clock, self.names = clock, names  # names: id(parameter) -> module name
        self.steps: list[collections.Counter] = []
        self.running: list[str] = []  # the node being timed (nodes do not nest on the CPU)

    def start_step(self) -> None:
        self.steps.append(collections.Counter())

    def node_label(self, node) -> str:
        """The node's kind and, for a node with a parameter input, its module's name."""
        for child, _ in node.next_functions:
            variable = getattr(child, "variable", None)
            if variable is not None and id(variable) in self.names:
                return f"{node.name()} {self.names[id(variable)]}"
        return node.name()

    def hook_graph(self, output: torch.Tensor) -> None:
        seen, stack = set(), [output.grad_fn]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            label, started = self.node_label(node), []

            def before(grad_outputs, label=label, started=started):
                self.running.append(label)
                started.append(self.clock())

            def after(grad_inputs, grad_outputs, label=label, started=started):
                self.steps[-1][label] += self.clock() - started.pop()
                self.running.pop()

            node.register_prehook(before)
            node.register_hook(after)
            stack.extend(child for child, _ in node.next_functions)

    def timed_native(self, function, part: str):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            start = self.clock()
            try:
                return function(*args, **kwargs)
            finally:
                if self.running and self.steps:
                    key = (self.running[-1], part)
                    self.steps[-1][key] += self.clock() - start

        return wrapper

    def labels(self) -> set[str]:
        """The nodes timed (without the native calls' keys)."""
        return {key for step in self.steps for key in step if isinstance(key, str)}

    def first_seen(self, label: str) -> int:
        """Where ``label`` first ran in the last step (the backward's order)."""
        return list(self.steps[-1]).index(label)

    def median(self, key) -> float:
        """Milliseconds per step, median over the steps."""
        return statistics.median(step[key] for step in self.steps) * 1e3


def parameter_names(model: nn.Module) -> dict[int, str]:
    return {id(parameter): name.rsplit(".", 1)[0] for name, parameter in model.named_parameters()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", choices=list(MODELS))
    parser.add_argument(
        "--policy", default="topk 0.05", choices=[p for p in POLICIES if p != "full"]
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=10, help="chunks of 5 steps per policy")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    build, batch_size, side, _ = MODELS[args.model]
    x, y = padded_mnist(side, limit=batch_size * 10)  # (N, 1, side, side)
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    runs, clocks, kernels = {}, {}, {}
    for name in ("full", args.policy):
        torch.manual_seed(0)
        model = tinyprop.apply(build(), POLICIES[name])
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        timer = clocks[name] = NodeClock(clock, parameter_names(model))
        last = list(model.modules())[-1]  # the graph is hooked once the forward is done
        last.register_forward_hook(lambda module, inputs, output, t=timer: t.hook_graph(output))

        def step(index, model=model, optimizer=optimizer, timer=timer):
            timer.start_step()
            rows = slice(index * batch_size, (index + 1) * batch_size)
            start = clock()
            stats = tinyprop.train_step(model, x[rows], y[rows], loss_fn, optimizer)
            timer.steps[-1]["step"] += clock() - start
            return stats

        runs[name] = step
    for name, part in PARTS.items():
        setattr(native, name, clocks[args.policy].timed_native(getattr(native, name), part))
    for name, step in runs.items():  # warm-up
        for index in range(5):
            stats = step(index)
        kernels[name] = stats.kernels
        clocks[name].steps.clear()
    load = os.getloadavg()[0]
    for _ in range(args.rounds):
        for step in runs.values():
            for index in range(5):
                step(index)
    full, sparse = clocks["full"], clocks[args.policy]
    unit = "process time" if args.threads == 1 else "wall time"
    print(f"{args.model}, {args.threads} thread(s), {len(full.steps)} steps each, ms per step "
          f"({unit}, median), load average {load:.2f} -> {os.getloadavg()[0]:.2f}")  # fmt: skip
    print(f"step: full {full.median('step'):.2f}, {args.policy} {sparse.median('step'):.2f}")
    print(
        f"| layer | full's backward | {args.policy}'s node | selection | kernel | layout | rest |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    dense_layers = {  # module name -> full's node of that layer
        label.split(" ", 1)[1]: label
        for label in full.labels()
        if label.split(" ", 1)[0] in LAYER_NODES[:3] and " " in label
    }
    totals = collections.Counter()
    for label in sorted(sparse.labels(), key=sparse.first_seen):  # backward order
        if not label.startswith("SparseBackpropBackward "):
            continue
        layer = label.split(" ", 1)[1]
        node = sparse.median(label)
        parts = {part: sparse.median((label, part)) for part in ("selection", "kernel", "layout")}
        dense = full.median(dense_layers[layer]) if layer in dense_layers else float("nan")
        rest = node - sum(parts.values())
        totals.update({"dense": dense, "node": node, "rest": rest, **parts})
        print(f"| {layer} | {dense:.2f} | {node:.2f} | {parts['selection']:.2f} | "
              f"{parts['kernel']:.2f} | {parts['layout']:.2f} | {rest:.2f} |")  # fmt: skip
    print(f"| all | {totals['dense']:.2f} | {totals['node']:.2f} | {totals['selection']:.2f} | "
          f"{totals['kernel']:.2f} | {totals['layout']:.2f} | {totals['rest']:.2f} |")  # fmt: skip
    print("other nodes, summed by kind (full / sparse):")
    kinds = collections.defaultdict(lambda: [0.0, 0.0])
    for index, timer in enumerate((full, sparse)):
        for label in timer.labels():
            kind = label.split(" ", 1)[0]
            if label != "step" and kind not in LAYER_NODES:
                kinds[kind][index] += timer.median(label)
    for kind, (dense, sparse_time) in sorted(kinds.items(), key=lambda item: -max(item[1])):
        if max(dense, sparse_time) >= 0.05:
            print(f"  {kind}: {dense:.2f} / {sparse_time:.2f}")
    print("kernels by layer: " + "; ".join(f"{k}: {v}" for k, v in kernels[args.policy].items()))


if __name__ == "__main__":
    main()
