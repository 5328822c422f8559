"""What a tinypropv2 step of a finetune run (mnist or har) must at least cost: the same
algorithm written out by hand in plain PyTorch (no autograd graph, no per-layer Python
machinery, no ledger or checks), against the library's ``full`` and ``tinypropv2`` steps,
plain PyTorch's dense step and the forward, loss and Adam alone.

The hand-written step (:class:`HandWrittenStep`) runs on the run's plain ``nn.Sequential``
(mnist's MLP 784-128-64-10, har's CNN of three Conv1d, ReLU, max / average pooling and a
Linear): the forward without a graph, keeping each module's input, δ_L from PyTorch's
cross-entropy backward kernels, Y_L and the skip decision D >= τ on Python floats
(:func:`tinyprop.functional.scalar_skip_decision`), then for each module from the output down,
on the trained rows only: a sparse layer's Y_l, Ymax_l and k
(:func:`tinyprop.functional.scalar_keep_counts`), its bias gradient and the library's own
per-layer kernels for the kept entries (``tinyprop.autograd._gradients``: the native top-k,
then the native kernels, PyTorch's sparse products or the dense ones on the masked δ, as the
library chooses); ReLU's and the pools' backward by the aten kernels autograd runs
(``threshold_backward``, ``max_pool2d_with_indices_backward`` with the indices found on the
trained rows, ``avg_pool2d_backward``); then Adam. It takes the same skips and k and gives the
same weights as the library's step (``--check`` compares them step by step, and the weights
after the steps bit for bit), so its time is what the algorithm costs when the bookkeeping
around it is free. The library's ``tinypropv2`` step runs these plain ``nn.Sequential`` models
without an autograd graph (:mod:`tinyprop.graph_free`); beside it, the same step by the
library's autograd path (``tinypropv2, autograd path``: ``tinyprop.graph_free.eligible``
turned off), and ``--check`` compares the two step by step (trained samples, k, kernels,
ledger) and the weights, running state and optimizer state after the run, bit for bit.

Run:
    python benchmarks/finetune_floor.py            # mnist, one thread, process time, chunks
    python benchmarks/finetune_floor.py --dataset har --runs 10   # whole runs, interleaved
    python benchmarks/finetune_floor.py --check --dataset har     # the library's skips, k, weights
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from unittest import mock

import numpy as np
import torch
from speed_floor import finetune_workload
from torch import nn

import tinyprop
from tinyprop import graph_free, native
from tinyprop.autograd import _gradients
from tinyprop.functional import scalar_keep_counts, scalar_running_max, scalar_skip_decision
from tinyprop.graph_free import module_backward
from tinyprop.patches import patches_for

aten = torch.ops.aten

SPARSE = (nn.Linear, nn.Conv1d)  # the layers tinyprop backpropagates sparsely


def cross_entropy_gradient(output: torch.Tensor, y: torch.Tensor):
    """The per-sample cross-entropy losses (B,) and ∂ loss_n / ∂ output_n (B, C), by the
    kernels autograd runs for ``F.cross_entropy(output, y, reduction="none")``."""
    log_probabilities = torch.log_softmax(output, 1)  # (B, C)
    losses = nn.functional.nll_loss(log_probabilities, y, reduction="none")  # (B,)
    ones = torch.ones(()).expand(len(y))  # (B,) ∂ Σ losses / ∂ loss_n
    target = aten.nll_loss_backward(ones, log_probabilities, y, None, 0, -100, ones[0])
    gradient = aten._log_softmax_backward_data(  # (B, C) ∂ loss_n / ∂ output_n
        target, log_probabilities, 1, log_probabilities.dtype
    )
    return losses, gradient


def autograd_path(step):
    """``step`` (a function running ``tinyprop.train_step``) with the graph-free step
    turned off."""

    def run(*args):
        with mock.patch.object(graph_free, "eligible", return_value=False):
            return step(*args)

    return run


class HandWrittenStep:
    """One tinypropv2 training step of a plain ``nn.Sequential`` of Linear, Conv1d, ReLU,
    MaxPool1d, AvgPool1d and Flatten modules (the finetune runs' MLP and har CNN), by hand."""

    def __init__(self, model: nn.Sequential, optimizer, config: tinyprop.TinyPropConfig):
        self.modules = list(model)
        self.layers = [module for module in model if isinstance(module, SPARSE)]
        self.model, self.optimizer, self.config = model, optimizer, config
        self.parameters = list(model.parameters())
        self.output_error_max = 0.0  # Ymax_L, kept in float32 as the library's buffer
        self.error_max = [0.0] * len(self.layers)  # Ymax_l, float32 as well
        self.last_keep: dict[int, list[int]] = {}  # k of each layer's trained rows, last step
        self.last_trained = 0
        self.geometries: dict = {}  # each layer's patch geometry per input shape
        self.first_trainable = next(
            position
            for position, module in enumerate(self.modules)
            if any(parameter.requires_grad for parameter in module.parameters())
        )

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        config = self.config
        for parameter in self.parameters:
            parameter.grad = None
        with torch.no_grad():
            inputs, output = [], x  # each module's input
            for module in self.modules:
                inputs.append(output)
                output = module(output)  # a max pool without its indices (the same values)
            _, gradient = cross_entropy_gradient(output, y)  # (B, C) ∂ loss_n / ∂ output_n
            batch = len(y)
            scores = gradient.abs().sum(1).tolist()  # (B,) Y_L
            trained, error_max = scalar_skip_decision(
                scores, self.output_error_max, config.d_min, config.d_max, config.beta,
                config.skip_threshold,
            )  # fmt: skip
            self.output_error_max = float(np.float32(error_max))
            rows = [row for row, keep in enumerate(trained) if keep]
            self.last_trained = len(rows)
            if not rows:
                return
            index = torch.tensor(rows)  # (R,) the trained samples
            unit = 1.0 / batch  # δ per unit of one sample's loss
            delta = gradient.index_select(0, index) * unit  # (R, C) δ_L of the trained rows
            number = len(self.layers)
            for position in reversed(range(len(self.modules))):
                module, below = self.modules[position], inputs[position].index_select(0, index)
                if isinstance(module, SPARSE):
                    number -= 1
                    needs_input = position > self.first_trainable  # a layer below trains
                    delta = self.layer_backward(number, module, below, delta, unit, needs_input)
                else:  # ReLU, pools and Flatten, by autograd's kernels
                    delta = module_backward(module, delta, below)
                if delta is None:
                    break
        self.optimizer.step()

    def layer_backward(self, number, layer, x, delta, unit, needs_input):
        """The sparse layer's backward on the trained rows: its kept entries, the bias and
        weight gradients (set), the input gradient (R, ...) or None."""
        config, depth = self.config, len(self.layers) - 1 - number
        key = (number, x.shape)
        geometry = self.geometries.get(key)
        if geometry is None:
            geometry = self.geometries[key] = patches_for(layer, x.shape, layer.weight.shape)
        flat = delta.reshape(len(x), -1)  # (R, N)
        errors = [value / unit for value in flat.abs().sum(1).tolist()]  # (R,) Y_l
        rows = [row for row, error in enumerate(errors) if error > 0]  # a zero δ keeps nothing
        if len(rows) < len(errors):
            flat, errors = flat[rows], [errors[row] for row in rows]  # (R', N), (R',)
        if not rows:  # as the library: zero gradients, Adam still steps the moments
            layer.weight.grad = torch.zeros_like(layer.weight)
            layer.bias.grad = torch.zeros_like(layer.bias)
            return torch.zeros_like(x) if needs_input else None
        maxima = scalar_running_max(errors, self.error_max[number])
        self.error_max[number] = float(np.float32(maxima[-1]))
        keep = scalar_keep_counts(
            errors, maxima, config.s_min, config.s_max, config.zeta, depth, flat.shape[1], 1.0
        )
        self.last_keep[number] = keep
        layer.bias.grad = flat.view(len(rows), geometry.channels_out, -1).sum((0, 2))  # (C_out,)
        grad_input, layer.weight.grad, _ = _gradients(
            select, geometry, x, layer.weight, torch.tensor(rows), flat,
            torch.tensor(keep), False, needs_input, True, None, (rows, keep),
        )  # fmt: skip
        return grad_input


def select(flat, keep, masked=False, with_rows=True, total=None):
    """The kept entries of δ (R, N): top-|δ|, the library's native selection."""
    return native.topk(flat, keep, masked=masked, with_rows=with_rows, total=total)


def steps(workload: dict) -> dict:
    """label -> function(x, y) running one step, each on its own copy of the model."""
    loss_fn, make = workload["loss"], workload["optimizer"]
    config = workload["policy"][1]

    def library(config):
        model = tinyprop.apply(copy.deepcopy(workload["model"]), config)
        optimizer = make(model)
        return lambda x, y: tinyprop.train_step(model, x, y, loss_fn, optimizer)

    plain = copy.deepcopy(workload["model"])
    plain_optimizer = make(plain)

    def plain_step(x, y):
        plain_optimizer.zero_grad(set_to_none=True)
        loss_fn(plain(x), y).mean().backward()
        plain_optimizer.step()

    alone = copy.deepcopy(workload["model"])
    alone_optimizer = make(alone)
    for parameter in alone.parameters():  # Adam's input, without any backward
        parameter.grad = torch.zeros_like(parameter)

    def forward_loss_adam(x, y):
        with torch.no_grad():
            loss_fn(alone(x), y)
        alone_optimizer.step()

    hand = copy.deepcopy(workload["model"])
    return {
        "full": library(tinyprop.TinyPropConfig(policy="full")),
        "tinypropv2": library(config),
        "tinypropv2, autograd path": autograd_path(library(config)),
        "plain PyTorch, dense": plain_step,
        "forward + loss + Adam": forward_loss_adam,
        "tinypropv2 by hand": HandWrittenStep(hand, make(hand), config),
    }


def check(workload: dict, count: int) -> None:
    """The hand-written step against the library's: trained samples and k of every layer at
    every step, and the weights after ``count`` steps."""
    config = workload["policy"][1]
    model = tinyprop.apply(copy.deepcopy(workload["model"]), config)
    optimizer = workload["optimizer"](model)
    hand_model = copy.deepcopy(workload["model"])
    hand = HandWrittenStep(hand_model, workload["optimizer"](hand_model), config)
    names = [name for name, module in model.named_modules() if isinstance(module, SPARSE)]
    differing = 0
    for x, y in workload["batches"][:count]:
        stats = tinyprop.train_step(model, x, y, workload["loss"], optimizer)
        hand(x, y)
        same = stats.trained == hand.last_trained and all(
            stats.keep[name].tolist() == hand.last_keep[number]
            for number, name in enumerate(names)
            if stats.trained
        )
        differing += not same
    largest = max(
        float((a - b).detach().abs().max())
        for a, b in zip(model.parameters(), hand_model.parameters(), strict=True)
    )
    equal = all(
        torch.equal(a, b) for a, b in zip(model.parameters(), hand_model.parameters(), strict=True)
    )
    print(f"{count} steps: {differing} with other skips or k; weights after them "
          f"{'equal bit for bit' if equal else f'differ by at most {largest:.3g}'}")  # fmt: skip
    check_graph_free(workload, count)


def check_graph_free(workload: dict, count: int) -> None:
    """The library's step (graph-free) against its autograd path: the step's trained
    samples, k, kernels and ledger at every step; the weights and running state (the state
    dict) and the optimizer state after ``count`` steps, bit for bit."""
    config, make = workload["policy"][1], workload["optimizer"]
    models = [tinyprop.apply(copy.deepcopy(workload["model"]), config) for _ in range(2)]
    optimizers = [make(model) for model in models]
    differing = 0
    for x, y in workload["batches"][:count]:
        stats = autograd_path(tinyprop.train_step)(models[0], x, y, workload["loss"], optimizers[0])
        other = tinyprop.train_step(models[1], x, y, workload["loss"], optimizers[1])
        fields = (stats.trained, stats.stepped, stats.macs, stats.kernels, list(stats.keep))
        same = fields == (other.trained, other.stepped, other.macs, other.kernels, list(other.keep))
        same = same and all(torch.equal(stats.keep[name], other.keep[name]) for name in stats.keep)
        differing += not same
    states = [model.state_dict() for model in models]
    equal = all(torch.equal(states[0][key], states[1][key]) for key in states[0])
    parameters = zip(models[0].parameters(), models[1].parameters(), strict=True)
    moments = all(
        torch.equal(optimizers[0].state[a][key], optimizers[1].state[b][key])
        for a, b in parameters
        for key in optimizers[0].state[a]
    )
    print(f"graph-free: {differing} of {count} steps with other skips, k, kernels or ledger "
          f"than the autograd path; weights and running state {'equal' if equal else 'DIFFERENT'}"
          f", optimizer state {'equal' if moments else 'DIFFERENT'} after them")  # fmt: skip


def measure(workload: dict, rounds: int, chunk: int) -> None:
    """Process time per step of each function, interleaved in chunks of the run's batches
    (one untimed chunk each first); each round's ratio to the library's ``full`` chunk."""
    functions = steps(workload)
    batches = workload["batches"]
    times: dict[str, list[float]] = {label: [] for label in functions}
    for round_index in range(rounds + 1):
        for label, function in functions.items():
            start = time.process_time()
            for step in range(round_index * chunk, (round_index + 1) * chunk):
                function(*batches[step % len(batches)])
            if round_index:
                times[label].append((time.process_time() - start) / chunk * 1e3)
    report(times)


def measure_runs(workload: dict, repeats: int) -> None:
    """Process time per step of whole runs (every batch of the run once, from the pretrained
    weights and fresh running state), each step kind in turn, ``repeats`` times after one
    untimed run each; each repeat's ratio to the library's ``full`` run."""
    batches = workload["batches"]
    times: dict[str, list[float]] = {}
    for repeat in range(repeats + 1):
        for label, function in steps(workload).items():  # fresh copies, untimed
            start = time.process_time()
            for batch in batches:
                function(*batch)
            if repeat:
                elapsed = (time.process_time() - start) / len(batches) * 1e3
                times.setdefault(label, []).append(elapsed)
    report(times)


def report(times: dict[str, list[float]]) -> None:
    """A table of each step kind's median ms per step and its ratio to ``full``'s."""
    full = times["full"]
    print("| step                   | ms (median) | vs full (quartiles) |")
    print("|------------------------|-------------|---------------------|")
    for label, values in times.items():
        ratios = sorted(value / dense for value, dense in zip(values, full, strict=True))
        quartiles = f"{ratios[len(ratios) // 4]:.2f}-{ratios[3 * len(ratios) // 4]:.2f}"
        print(f"| {label:<22} | {statistics.median(values):>11.3f} | "
              f"{statistics.median(ratios):.2f} ({quartiles}) |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=30, help="timed chunks per step kind")
    parser.add_argument("--chunk", type=int, default=20, help="steps per chunk")
    parser.add_argument("--check", action="store_true", help="compare with the library's step")
    parser.add_argument("--steps", type=int, default=200, help="steps compared by --check")
    parser.add_argument("--dataset", default="mnist", choices=["mnist", "har"])
    parser.add_argument("--runs", type=int, default=0, help="time whole runs instead, N times")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the bench runs
    workload = finetune_workload(args.dataset)
    if args.check:
        check(workload, args.steps)
        return
    start_load = os.getloadavg()[0]
    if args.runs:
        measure_runs(workload, args.runs)
    else:
        measure(workload, args.rounds, args.chunk)
    print(f"load average {start_load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
