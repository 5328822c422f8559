"""The ``finetune`` protocol under a memory-lean training mode (:mod:`tinyprop.memory`).

The same data, splits, pretrained weights and batch order as ``tinyprop bench --suite small
--protocol finetune``; the mode freezes the layers before its first trained one, chooses the
optimizer (Adam at the plan's learning rate, or SGD) and the update semantics (one step per
batch, or per sample in place), so that every RAM figure of the C runtime has an accuracy
beside it. One JSON record per (dataset, mode, policy setting, seed); finished runs are
skipped.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch

import tinyprop
from tinyprop import models
from tinyprop.bench import runner, store, suites
from tinyprop.bench.training import batches, evaluate, per_sample_cross_entropy
from tinyprop.memory import TrainingMode, freeze

# the tinypropv2 setting the small finetune suite chose per dataset on its validation split
# (benchmarks/results/small-finetune/report.md), run beside dense training in every mode
CHOSEN_TINYPROPV2 = {
    "har": {"zeta": 1.0, "s_max": 0.5, "skip_threshold": 0.5},
    "speech_commands": {"zeta": 1.0, "skip_threshold": 0.5},
}


def run_spec(dataset: str, policy: str, settings: dict, seed: int) -> runner.RunSpec:
    """The small suite's finetune run of ``dataset`` (its data plan, splits and seed)."""
    suite = suites.get("small")
    (spec,) = [
        s
        for s in runner.plan_runs(suite, "finetune", ".", [dataset], ["full"], [seed])
        if s.settings == {}
    ]
    return replace(spec, policy=policy, settings=dict(settings))


def record_path(results: Path, dataset: str, mode: TrainingMode, label: str, seed: int) -> Path:
    """Where the record of one run goes."""
    return results / f"finetune__{dataset}__{mode.name}__{label}__seed{seed}.json"


def run_mode(dataset: str, mode: TrainingMode, policy: str, settings: dict, seed: int) -> dict:
    """Pretrained weights, the mode's frozen layers and optimizer, the finetune training run,
    the test accuracy. Returns the record."""
    start = time.perf_counter()
    spec = run_spec(dataset, policy, settings, seed)
    torch.set_num_threads(spec.threads)
    pool, test, splits, model_dataset, model = runner.prepare(spec)
    model.load_state_dict(runner.pretrained_state(spec))
    pretrained_metric = evaluate(model, test.x, test.y, False)[1]
    frozen = freeze(model, mode.memory)
    config = tinyprop.TinyPropConfig(policy=policy, seed=seed, **settings)
    tinyprop.apply(model, config)
    lr = mode.learning_rate(spec.plan.lr, spec.plan.batch_size)
    optimizer = mode.optimizer_for(model, lr)
    x, y = pool.x[splits.train], pool.y[splits.train]
    ledger, trained, skipped = tinyprop.Ledger(), 0, 0
    model.train()
    try:
        for _, index in batches(len(x), spec.plan.batch_size, spec.plan.epochs, spec.seed + 2000):
            stats = mode.step(model, x[index], y[index], per_sample_cross_entropy, optimizer)
            ledger += stats.macs
            trained += stats.trained
            skipped += stats.skipped
    finally:
        tinyprop.remove(model)
    _, val_metric = evaluate(model, pool.x[splits.val], pool.y[splits.val], False)
    _, metric = evaluate(model, test.x, test.y, False)
    return {
        "dataset": dataset,
        "model": models.reference(model_dataset, spec.plan.variant).model_name,
        "mode": mode.name,
        "mode_description": mode.description,
        "first_trained_layer": mode.memory.first_trained_layer,
        "sgd_in_place": mode.memory.sgd_in_place,
        "bias_only_layers": list(mode.memory.bias_only_layers),
        "momentum_in_place": mode.memory.momentum_in_place,
        "selection_in_place": mode.memory.selection_in_place,
        "adam_in_place": mode.memory.adam_in_place,
        "moment_bits": mode.memory.moment_bits,
        "recompute_layers": list(mode.memory.recompute_layers),
        "frozen_layers": frozen,
        "optimizer": mode.optimizer,
        "momentum": mode.momentum,
        "lr": lr,
        "policy": policy,
        "settings": dict(settings),
        "protocol": "finetune",
        "seed": seed,
        "metric_name": "accuracy",
        "metric": metric,
        "val_metric": val_metric,
        "pretrained_metric": pretrained_metric,
        "trained_samples": trained,
        "skipped_samples": skipped,
        "ledger": ledger.as_dict(),
        "epochs": spec.plan.epochs,
        "batch_size": spec.plan.batch_size,
        "wall_s": time.perf_counter() - start,
        "commit": store.commit_hash(),
        "torch": torch.__version__,
    }
