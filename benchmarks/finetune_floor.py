"""What a tinypropv2 step of the mnist finetune run must at least cost: the same algorithm
written out by hand in plain PyTorch (no autograd graph, no per-layer Python machinery, no
ledger or checks), against the library's ``full`` and ``tinypropv2`` steps, plain PyTorch's
dense step and the forward, loss and Adam alone.

The hand-written step (:class:`HandWrittenStep`) runs on the run's MLP 784-128-64-10: the
forward without a graph, δ_L from PyTorch's cross-entropy backward kernels, Y_L and the
skip decision D >= τ on Python floats (:func:`tinyprop.functional.scalar_skip_decision`), then
for each layer from the output down, on the trained rows only: Y_l, Ymax_l and k
(:func:`tinyprop.functional.scalar_keep_counts`), the top-k of |δ| (``tinyprop.native.topk``),
the bias and weight gradients and the next δ (ReLU's mask; the products on the masked δ, or
the native kernel on the kept entries below the library's density limit), then Adam. It takes
the same skips and k and gives the same weights as the library's step (``--check`` compares
them step by step, and the weights after the steps bit for bit), so its time is what the
algorithm costs when the bookkeeping around it is free: the floor any implementation of the
step in PyTorch operations has to beat.

Run:
    python benchmarks/finetune_floor.py            # one thread, process time, interleaved
    python benchmarks/finetune_floor.py --check    # the same skips, k and weights as the library
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from speed_floor import finetune_workload
from torch import nn

import tinyprop
from tinyprop import native
from tinyprop.autograd import NATIVE_DENSE_KERNEL_DENSITY
from tinyprop.functional import scalar_keep_counts, scalar_running_max, scalar_skip_decision

aten = torch.ops.aten


class HandWrittenStep:
    """One tinypropv2 training step of a Flatten-Linear-ReLU-...-Linear model, by hand."""

    def __init__(self, model: nn.Sequential, optimizer, config: tinyprop.TinyPropConfig):
        self.layers = [module for module in model if isinstance(module, nn.Linear)]
        self.model, self.optimizer, self.config = model, optimizer, config
        self.output_error_max = 0.0  # Ymax_L, kept in float32 as the library's buffer
        self.error_max = [0.0] * len(self.layers)  # Ymax_l, float32 as well
        self.last_keep: dict[int, list[int]] = {}  # k of each layer's trained rows, last step
        self.last_trained = 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        config, layers = self.config, self.layers
        for parameter in self.model.parameters():
            parameter.grad = None
        with torch.no_grad():
            inputs = [x.flatten(1)]  # each layer's input: (B, in)
            for index, layer in enumerate(layers):
                z = F.linear(inputs[-1], layer.weight, layer.bias)  # (B, out)
                inputs.append(torch.relu(z) if index < len(layers) - 1 else z)
            output = inputs.pop()  # (B, C) logits
            log_probabilities = torch.log_softmax(output, 1)
            F.nll_loss(log_probabilities, y, reduction="none")  # the losses (B,)
            batch = len(y)
            ones = torch.ones(()).expand(batch)  # (B,) ∂ Σ losses / ∂ loss_n
            target = aten.nll_loss_backward(ones, log_probabilities, y, None, 0, -100, ones[0])
            gradient = aten._log_softmax_backward_data(  # (B, C) ∂ loss_n / ∂ output_n
                target, log_probabilities, 1, log_probabilities.dtype
            )
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
            index = torch.tensor(rows)  # (R,)
            unit = 1.0 / batch  # δ per unit of one sample's loss
            delta = gradient.index_select(0, index) * unit  # (R, C) δ_L of the trained rows
            for number in reversed(range(len(layers))):
                layer, depth = layers[number], len(layers) - 1 - number
                errors = [value / unit for value in delta.abs().sum(1).tolist()]  # (R,) Y_l
                maxima = scalar_running_max(errors, self.error_max[number])
                self.error_max[number] = float(np.float32(maxima[-1]))
                keep = scalar_keep_counts(
                    errors, maxima, config.s_min, config.s_max, config.zeta, depth,
                    delta.shape[1], 1.0,
                )  # fmt: skip
                self.last_keep[number] = keep
                layer_input = inputs[number].index_select(0, index)  # (R, in)
                layer.bias.grad = delta.sum(0)  # (out,) from the whole δ
                if sum(keep) > NATIVE_DENSE_KERNEL_DENSITY * delta.numel():  # as the library
                    masked = native.topk(delta, torch.tensor(keep), masked=True)  # (R, out)
                    layer.weight.grad = torch.mm(masked.t(), layer_input)  # (out, in)
                    grad_input = torch.mm(masked, layer.weight) if number else None  # (R, in)
                else:  # the native kernel on the kept entries
                    _, column, value = native.topk(delta, torch.tensor(keep), with_rows=False)
                    row_start = torch.tensor(list(itertools.accumulate(keep, initial=0)))
                    grad_input, layer.weight.grad = native.linear_backward(
                        layer_input, layer.weight, row_start, column, value, number > 0, True
                    )  # (R, in), (out, in)
                if number:  # δ of the layer below, through its ReLU
                    delta = grad_input * (layer_input > 0)  # (R, in)
        self.optimizer.step()


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
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
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
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the bench runs
    workload = finetune_workload("mnist")
    if args.check:
        check(workload, args.steps)
        return
    start_load = os.getloadavg()[0]
    measure(workload, args.rounds, args.chunk)
    print(f"load average {start_load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
