"""Where a fine-tuning run's time goes: process time per phase of ``tinyprop.train_step``, full
vs tinypropv2, what a step that skips every sample costs beside the forward and loss, and the
run's steps by kind (every sample skipped, or some trained) against full's same steps.

Run:
    python benchmarks/step_phases.py    # har and mnist finetune (small suite, seed 0), one thread
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import statistics
import time

import torch
from finetune_speed import SETTINGS
from speed_floor import finetune_workload
from torch import nn

import tinyprop
from tinyprop import autograd, step, trainer
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
    """Process time of the run's phases, per policy (the backward includes the decision and
    the sparse layers' backward)."""
    trainer.run_backward = timed(trainer.run_backward, "backward (with the decision)")
    step._open_step = timed(step._open_step, "decision")
    sparse = autograd.SparseBackprop
    sparse.backward = staticmethod(timed(sparse.backward, "sparse layers' backward"))
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


def step_kinds(dataset: str, repeats: int = 5) -> None:
    """Wall time of every step of the finetune run, full and tinypropv2 interleaved run by run,
    the least of ``repeats`` runs per step (the load of other processes only adds); the
    tinypropv2 steps that skip every sample and those that train some, beside full's."""
    workload = finetune_workload(dataset)
    torch.set_num_threads(1)  # the bench's loaders set one thread
    configs = {"full": tinyprop.TinyPropConfig(policy="full"), "tinypropv2": workload["policy"][1]}
    times: dict[str, list[list[float]]] = {label: [] for label in configs}
    trained = []
    for _ in range(repeats + 1):  # the first run of each warms up, untimed
        for label, config in configs.items():
            model = tinyprop.apply(copy.deepcopy(workload["model"]), config)
            optimizer = workload["optimizer"](model)
            seconds, trained = [], []
            for x, y in workload["batches"]:
                start = time.perf_counter()
                stats = tinyprop.train_step(model, x, y, workload["loss"], optimizer)
                seconds.append(time.perf_counter() - start)
                trained.append(stats.trained)
            times[label].append(seconds)
    least = {label: [min(s) for s in zip(*runs[1:], strict=True)] for label, runs in times.items()}
    full, sparse = least["full"], least["tinypropv2"]
    print(f"{dataset} finetune, {len(full)} steps (least of {repeats} runs per step): full "
          f"{1e3 * statistics.median(full):.2f} ms per step (median), tinypropv2 "
          f"{sum(sparse) / sum(full):.2f}x full's whole run")  # fmt: skip
    for kind, steps in (("skip every sample", [i for i, k in enumerate(trained) if k == 0]),
                        ("train some", [i for i, k in enumerate(trained) if k > 0])):  # fmt: skip
        if steps:
            own, dense = [sparse[i] for i in steps], [full[i] for i in steps]
            print(f"  {len(steps)} steps {kind}: tinypropv2 {1e3 * statistics.median(own):.2f} "
                  f"ms per step against full's {1e3 * statistics.median(dense):.2f}, "
                  f"{100 * sum(own) / sum(sparse):.0f}% of tinypropv2's time")  # fmt: skip


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    skipped_step("har CNN, batch 8", har.cnn1d(4, (6, 100)), torch.randn(8, 6, 100))
    skipped_step("mnist CNN, batch 32", mnist.cnn(), torch.randn(32, 1, 28, 28))
    for dataset in ("har", "mnist"):
        step_kinds(dataset)
    phases()


if __name__ == "__main__":
    main()
