"""Why do sparse policies lose accuracy in the ``finetune`` protocol? A rerunnable study.

Each row trains one model with ``tinyprop.train_step`` under one (policy, settings, recipe) and
prints the test metric and the backward ratio. The recipe knobs are those suspected of hurting
sparse training (see ``benchmarks/results/accuracy_study.md`` for the findings):

- optimizer: ``adam`` (the bench default) or ``sgd`` (momentum 0.9), with its learning rate;
- BatchNorm mode during on-device training: ``train`` (batch statistics, running stats updated)
  or ``eval`` (frozen running statistics; BN affine parameters still trained);
- ``dense-out``: a diagnosis only, the output layer keeps dense backprop (the other layers
  follow the policy); done by giving the output layer a subclass that ``tinyprop.apply`` skips.

Data, splits, sizes and pretrained weights are those of the ``small`` suite (the pretrained
weights come from the bench cache, so every row of a dataset starts from the same weights;
since PRETRAIN_VERSION 2 they end with recomputed BatchNorm statistics);
``--train-samples`` caps the on-device training part to keep a row short.

Examples:
    .venv/bin/python benchmarks/accuracy_study.py --study optimizer --dataset cifar10
    .venv/bin/python benchmarks/accuracy_study.py --study bn output settings --dataset cifar10
    .venv/bin/python benchmarks/accuracy_study.py --study optimizer --dataset mnist \
        --protocol scratch --train-samples 3000
"""

from __future__ import annotations

import argparse
import time
import warnings
from dataclasses import dataclass, replace

import torch
from torch import nn

import tinyprop
from tinyprop.bench import protocols, runner, suites
from tinyprop.bench.training import batches, evaluate, loss_function, recalibrate_batchnorm


@dataclass(frozen=True)
class Recipe:
    """How the on-device training is run (everything but the policy)."""

    optimizer: str = "adam"  # "adam" | "sgd" (momentum 0.9)
    lr: float = 1e-3
    batchnorm: str = "train"  # "train" | "eval" (frozen running statistics)
    recalibrate: bool = False  # diagnosis: recompute BN running statistics after training
    dense_output: bool = False  # diagnosis: the output layer keeps dense backprop

    @property
    def label(self) -> str:
        """Short description, e.g. ``sgd 0.01 bn=eval``."""
        text = f"{self.optimizer} {self.lr:g} bn={self.batchnorm}"
        text += "+recal" if self.recalibrate else ""
        return text + (" dense-out" if self.dense_output else "")


class _DenseLinear(nn.Linear):
    """An nn.Linear that ``tinyprop.apply`` does not recognise, so it stays dense."""


def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """The recipe's optimizer over all parameters of ``model``."""
    if recipe.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=recipe.lr)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=0.9)
    raise ValueError(f"unknown optimizer {recipe.optimizer!r}; use adam or sgd")


def set_batchnorm_mode(model: nn.Module, mode: str) -> None:
    """Put every BatchNorm of ``model`` in train mode or eval mode (frozen statistics)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train(mode == "train")


def train_row(model, config, x, y, recipe: Recipe, epochs, batch_size, seed, autoencoder):
    """Train ``model`` in place; returns ``(ledger, skip_rate, seconds)``."""
    loss_fn = loss_function(autoencoder)
    output_layer = [m for m in model.modules() if type(m) in (nn.Linear, nn.Conv2d)][-1]
    if recipe.dense_output:
        if type(output_layer) is not nn.Linear:
            raise ValueError("dense-out needs an nn.Linear output layer")
        output_layer.__class__ = _DenseLinear
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the "kept dense" warning of dense-out
        tinyprop.apply(model, config)
    optimizer = make_optimizer(model, recipe)
    ledger, trained, skipped = tinyprop.Ledger(), 0, 0
    start = time.perf_counter()
    model.train()
    set_batchnorm_mode(model, recipe.batchnorm)
    try:
        for _, index in batches(len(x), batch_size, epochs, seed):
            inputs = x[index]
            target = inputs if autoencoder else y[index]
            stats = tinyprop.train_step(model, inputs, target, loss_fn, optimizer)
            ledger += stats.macs
            trained += stats.trained
            skipped += stats.skipped
    except FloatingPointError:
        return None, 0.0, time.perf_counter() - start  # diverged
    finally:
        tinyprop.remove(model)
        if recipe.dense_output:
            output_layer.__class__ = nn.Linear
    if recipe.recalibrate:
        recalibrate_batchnorm(model, x)
    return ledger, skipped / max(1, trained + skipped), time.perf_counter() - start


def grid(study: str, dataset: str) -> list[tuple[str, dict, Recipe]]:
    """The rows of one study: ``(policy, settings, recipe)``."""
    v2 = {"zeta": 1.0, "skip_threshold": 0.3}
    policies = [
        ("full", {}),
        ("topk", {"ratio": 0.1}),
        ("topk", {"ratio": 0.3}),
        ("tinyprop", {"zeta": 1.0}),
        ("tinypropv2", v2),
    ]
    conv = dataset != "mnist"
    sgd_lrs = (0.01, 0.05) if conv else (0.05,)
    if study == "optimizer":
        recipes = [Recipe("adam", 1e-3)] + [Recipe("sgd", lr) for lr in sgd_lrs]
        return [(p, s, r) for r in recipes for p, s in policies]
    if study == "recal":
        recipes = [Recipe("adam", 1e-3, recalibrate=True), Recipe("sgd", 0.01, recalibrate=True)]
        no_training = ("full", {}, Recipe("sgd", 0.0, recalibrate=True))  # start + recal only
        return [no_training] + [(p, s, r) for r in recipes for p, s in policies]
    if study == "adamlr":
        return [(p, s, Recipe("adam", lr)) for lr in (1e-4, 3e-4) for p, s in policies]
    if study == "bn":
        recipes = [Recipe("adam", 1e-3, "eval"), Recipe("sgd", 0.01, "eval")]
        return [(p, s, r) for r in recipes for p, s in policies]
    if study == "output":
        sparse = [("topk", {"ratio": 0.1}), ("topk", {"ratio": 0.3}), ("tinypropv2", v2)]
        recipes = [
            Recipe("adam", 1e-3, dense_output=True, recalibrate=conv),
            Recipe("sgd", 0.01 if conv else 0.05, dense_output=True, recalibrate=conv),
        ]
        return [(p, s, r) for r in recipes for p, s in sparse]
    if study == "settings":
        recipe = Recipe("adam", 1e-3, recalibrate=conv)
        settings = [
            ("tinyprop", {"zeta": 0.5}),
            ("tinyprop", {"zeta": 1.0}),
            ("tinyprop", {"zeta": 1.0, "s_min": 0.0, "s_max": 1.0}),
            ("tinyprop", {"zeta": 1.0, "s_min": 0.2, "s_max": 0.9}),
            ("tinypropv2", {"zeta": 0.5, "skip_threshold": 0.3}),
            ("tinypropv2", {"zeta": 1.0, "skip_threshold": 0.1}),
            ("tinypropv2", {"zeta": 1.0, "skip_threshold": 0.3}),
            ("tinypropv2", {"zeta": 1.0, "skip_threshold": 0.5}),
        ]
        return [(p, s, recipe) for p, s in settings]
    raise ValueError(f"unknown study {study!r}")


STUDIES = ("optimizer", "adamlr", "bn", "recal", "output", "settings")


def main(argv: list[str] | None = None) -> int:
    """Run the chosen studies and print one table row per run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", nargs="+", default=["optimizer"], choices=STUDIES)
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--protocol", default="finetune", choices=protocols.PROTOCOLS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-samples", type=int, help="cap on the on-device training part")
    parser.add_argument("--epochs", type=int, help="on-device epochs (default: the suite's)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    suite = suites.get("small")
    plan = suite.datasets[args.dataset]
    if args.epochs:
        plan = replace(plan, epochs=args.epochs)
    base = runner.RunSpec(
        suite="small",
        dataset=args.dataset,
        policy="full",
        settings={},
        protocol=args.protocol,
        seed=args.seed,
        plan=suite.datasets[args.dataset],
    )
    pool, test, splits, model_dataset, model = runner._prepare(base)
    autoencoder = tinyprop.models.is_autoencoder(model_dataset)
    start_state = {k: v.clone() for k, v in model.state_dict().items()}
    if args.protocol == "finetune":
        start_state = runner.pretrained_state(base)
        model.load_state_dict(start_state)
    train = splits.train[: args.train_samples]
    name, start_metric = evaluate(model, test.x, test.y, autoencoder)
    print(
        f"# {args.dataset} ({pool.source}) {args.protocol} seed {args.seed}: "
        f"{len(train)} on-device samples x {plan.epochs} epochs, batch {plan.batch_size}, "
        f"test {len(test.y)}; start {name} {start_metric:.1f}"
    )
    print("| study | policy | settings | recipe | " + name + " | backward_ratio | skip | s |")
    print("|---|---|---|---|---|---|---|---|")
    for study in args.study:
        for policy, settings, recipe in grid(study, args.dataset):
            model.load_state_dict(start_state)
            config = tinyprop.TinyPropConfig(policy=policy, seed=args.seed, **settings)
            ledger, skip, seconds = train_row(
                model, config, pool.x[train], pool.y[train], recipe, plan.epochs,
                plan.batch_size, args.seed + 2000, autoencoder,
            )  # fmt: skip
            label = f"| {study} | {policy} | {suites.settings_label(settings)} | {recipe.label} | "
            if ledger is None:
                print(label + f"diverged (NaN loss) | - | - | {seconds:.0f} |", flush=True)
                continue
            metric = evaluate(model, test.x, test.y, autoencoder)[1]
            print(label + f"{metric:.1f} | {ledger.backward_ratio():.3f} | {skip:.2f} | "
                  f"{seconds:.0f} |", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
