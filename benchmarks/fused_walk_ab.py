"""What the one walk (``native.linear_input_update``) would be worth in a fused SGD step, if
``train_step(fused_update=True)`` took it: an experiment, not the library's behaviour.

Today a fused layer's backward computes its input gradient (the weight read once) and defers
SGD's step until every gradient of the step is checked (the weight read and written again);
the one walk does both in one pass, but steps the weight during the backward, before the layers
below it are checked, so ``train_step`` does not take it (see docs/speed.md). This script
patches the step, in this process only, so that a fused layer's input-gradient call becomes the
one walk and its deferred update is dropped (plain SGD), and alternates chunks of steps of two
models, one stepping as today and one through the walk, from the same initial weights on the
same batches. It prints milliseconds per step (median and least of the chunks), the median of
the paired ratios walk / today and whether the two models' weights came out equal (they must:
the same sums in the same order).

Run:
    python benchmarks/fused_walk_ab.py --model deep
    python benchmarks/fused_walk_ab.py --model wide --threads 2 --clock wall
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import tinyprop
import tinyprop.trainer
from tinyprop import native
from tinyprop.step import StepContext

LR = 0.01
SIZES = {"wide": ([784, 2048, 2048, 10], 128), "deep": ([1024, 2048, 2048, 2048, 10], 64)}


class Walk:
    """The patches: while ``on``, a deferred update's layer walks once instead."""

    def __init__(self):
        self.on, self.walks, self.pending = False, 0, {}
        self.defer, self.backward = StepContext.defer_update, native.linear_backward
        self.fold = tinyprop.trainer.fold_into_gradients
        self.apply = tinyprop.trainer.apply_updates
        StepContext.defer_update = lambda step, *arguments: self.defer_update(step, *arguments)
        native.linear_backward = self.linear_backward
        tinyprop.trainer.fold_into_gradients = self.fold_into_gradients
        tinyprop.trainer.apply_updates = self.apply_updates

    def defer_update(self, step, weight_id, error, unit, x, row_start, column, value):
        accepted = self.defer(step, weight_id, error, unit, x, row_start, column, value)
        if accepted and self.on:  # this weight's input gradient call will walk
            weight = step.deferred_updates[-1][0]
            self.pending[weight.data_ptr()] = (step, len(step.deferred_updates) - 1)
        return accepted

    def linear_backward(self, x, weight, row_start, column, value, needs_input, needs_weight,
                        relu_mask=False):  # fmt: skip
        if needs_input and not needs_weight and weight.data_ptr() in self.pending:
            step, index = self.pending.pop(weight.data_ptr())
            step.deferred_updates[index] = None  # stepped here
            self.walks += 1
            grad_input = native.linear_input_update(
                x, weight, row_start, column, value, -LR, relu_mask=relu_mask
            )
            return grad_input, None
        return self.backward(
            x, weight, row_start, column, value, needs_input, needs_weight, relu_mask
        )

    def fold_into_gradients(self, step):
        step.deferred_updates = [update for update in step.deferred_updates if update]
        return self.fold(step)

    def apply_updates(self, step, optimizer):
        step.deferred_updates = [update for update in step.deferred_updates if update]
        return self.apply(step, optimizer)


def mlp(sizes: list[int]) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    layers = []
    for index, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
        layers += [nn.Linear(fan_in, fan_out)] + ([nn.ReLU()] if index < len(sizes) - 2 else [])
    model = tinyprop.apply(
        nn.Sequential(*layers), tinyprop.TinyPropConfig(policy="topk", ratio=0.05)
    )
    return model, torch.optim.SGD(model.parameters(), lr=LR)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=list(SIZES), default="deep")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=5, help="steps per timed chunk")
    parser.add_argument("--clock", choices=["process", "wall"], default="process")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "process" else time.perf_counter
    sizes, batch = SIZES[args.model]
    walk = Walk()
    models = {name: mlp(sizes) for name in ("today", "walk")}
    generator = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(batch, sizes[0], generator=generator), torch.randint(0, 10, (batch,)))
        for _ in range(8)
    ]
    loss = nn.CrossEntropyLoss(reduction="none")
    steps = {"today": 0, "walk": 0}

    def run(name: str, count: int) -> float:
        walk.on = name == "walk"
        model, optimizer = models[name]
        start = clock()
        for _ in range(count):
            x, y = batches[steps[name] % len(batches)]
            steps[name] += 1
            tinyprop.train_step(model, x, y, loss, optimizer, fused_update=True)
        return 1e3 * (clock() - start) / count

    times = {"today": [], "walk": []}
    for index in range(args.rounds + 1):  # the first round warms up
        for name in ("today", "walk") if index % 2 else ("walk", "today"):
            milliseconds = run(name, args.chunk)
            if index:
                times[name].append(milliseconds)
    ratios = [new / old for new, old in zip(times["walk"], times["today"], strict=True)]
    parameters = [model.parameters() for model, _ in models.values()]
    same = all(torch.equal(p, q) for p, q in zip(*parameters, strict=True))
    print(
        f"{args.model} MLP topk 0.05 fused SGD, {args.threads} thread(s), {args.clock} time, "
        f"{walk.walks} walks in {steps['walk']} steps; ms per step: today "
        f"{statistics.median(times['today']):.2f} (least {min(times['today']):.2f}), walk "
        f"{statistics.median(times['walk']):.2f} (least {min(times['walk']):.2f}); walk / today, "
        f"median of pairs {statistics.median(ratios):.3f}; weights equal: {same}"
    )


if __name__ == "__main__":
    main()
