"""Where a fine-tuning run's time goes: process time per phase of ``tinyprop.train_step``, full
vs tinypropv2, and what a step that skips every sample costs beside the forward and loss.

Run:
    python benchmarks/step_phases.py            # har finetune (small suite, seed 0), one thread
"""

from __future__ import annotations

import collections
import dataclasses
import time

import torch
from finetune_speed import SETTINGS
from torch import nn

import tinyprop
from tinyprop import step, trainer
from tinyprop.bench import runner, suites
from tinyprop.models import har, mnist

SECONDS: dict[str, float] = collections.defaultdict(float)


def timed(function, phase: str):
    def wrapper(*args, **kwargs):
        start = time.process_time()
        try:
            return function(*args, **kwargs)
        finally:
            SECONDS[phase] += time.process_time() - start

    return wrapper


def phases(dataset: str = "har", repeats: int = 2) -> None:
    """Process time of the run's phases, per policy (the backward includes the decision)."""
    trainer.run_backward = timed(trainer.run_backward, "backward (with the decision)")
    step._step_loss = timed(step._step_loss, "decision")
    torch.optim.Adam.step = timed(torch.optim.Adam.step, "optimizer")
    specs = {}
    for label in ("full", "tinypropv2"):
        policy, settings = SETTINGS[label]
        (spec,) = runner.plan_runs(
            suites.get("small"), "finetune", "/nonexistent", datasets=[dataset],
            policies=[policy], seeds=[0], max_settings=1,
        )  # fmt: skip
        specs[label] = dataclasses.replace(spec, settings=settings)
    pretrained = runner.pretrained_state(specs["full"])
    for _ in range(repeats):
        for label, spec in specs.items():
            SECONDS.clear()
            record = runner.execute_run(spec, pretrained, write=False)
            times = ", ".join(f"{phase} {seconds:.3f} s" for phase, seconds in SECONDS.items())
            print(f"{dataset} {label}: training wall {record['train_wall_s']:.3f} s; {times}")


def skipped_step(name: str, network: nn.Module, x: torch.Tensor, steps: int = 300) -> None:
    """A tinypropv2 step that skips every sample against the forward and loss alone."""
    model = tinyprop.apply(network, tinyprop.TinyPropConfig(policy="tinypropv2"))
    model.tinyprop_output_error_max.fill_(1e6)  # every sample's Y_L is far below Ymax_L
    optimizer = torch.optim.Adam(model.parameters())
    y = torch.zeros(len(x), dtype=torch.long)
    loss_fn = nn.CrossEntropyLoss(reduction="none")

    def forward():
        loss_fn(model(x), y)
        tinyprop.model.state_of(model).take_passes()

    def train():
        stats = tinyprop.train_step(model, x, y, loss_fn, optimizer)
        assert stats.skipped == len(x) and not stats.stepped

    costs = {}
    for label, function in (("forward and loss", forward), ("skipped step", train)):
        for _ in range(20):
            function()
        best = []
        for _ in range(5):
            start = time.process_time()
            for _ in range(steps):
                function()
            best.append((time.process_time() - start) / steps * 1e3)
        costs[label] = min(best)
    ratio = costs["skipped step"] / costs["forward and loss"]
    print(f"{name}: forward and loss {costs['forward and loss']:.2f} ms, a step skipping every "
          f"sample {costs['skipped step']:.2f} ms ({ratio:.2f}x)")  # fmt: skip


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    skipped_step("har CNN, batch 8", har.cnn1d(4, (6, 100)), torch.randn(8, 6, 100))
    skipped_step("mnist CNN, batch 32", mnist.cnn(), torch.randn(32, 1, 28, 28))
    phases()


if __name__ == "__main__":
    main()
