"""The tables of ``docs/budget.md`` from the budget suite's records.

    python benchmarks/budget_tables.py [--results benchmarks/results]

Reads ``budget-finetune`` and ``budget-scratch`` under ``--results`` and prints Markdown:
the backward ratio reached at each budget (every policy, every seed), the accuracy change
against full training (mean over the seeds both have, Adam and SGD-momentum), the equal-compute
comparison of the policies, and the alternatives the defaults were chosen against.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics

DATASETS = (
    "mnist", "har", "cifar10", "cifar100", "flowers102", "food101", "speech_commands",
    "dcase2020", "fashion_mnist", "digits",
)  # fmt: skip
REAL = {
    "mnist": "real MNIST", "har": "real BasicMotions", "cifar10": "real Fashion-MNIST, ResNet-8",
    "fashion_mnist": "real, MLP", "digits": "real optdigits, MLP",
}  # fmt: skip
# the models with BatchNorm (ResNet-8, MobileNet): batch_norm_trained_rows acts there only
BATCH_NORM = ("cifar10", "cifar100", "flowers102", "food101")
POLICIES = ("tinypropv2", "topk", "randomk", "selective_backprop")
BUDGETS = (0.05, 0.1, 0.2, 0.3)
SGD = {"optimizer": "sgd", "lr": 0.01}
SEEDS = (0, 1, 2)  # the seeds of every table but the one with more seeds


def load(folder: str) -> list[dict]:
    return [json.load(open(path)) for path in sorted(glob.glob(os.path.join(folder, "*.json")))]


def default_budget(record: dict, extra: dict | None = None) -> float | None:
    """b of a run at the budget defaults (topk / randomk: meProp's dense output layer), plus
    ``extra`` recipe fields; None otherwise."""
    settings = dict(record["settings"])
    budget = settings.pop("budget", None)
    if record["policy"] in ("topk", "randomk"):
        settings.pop("dense_output_layer", None)
    extra = dict(extra or {})
    if record["dataset"] not in BATCH_NORM:  # the setting changes nothing without BatchNorm
        for fields in (settings, extra):
            fields.pop("batch_norm_trained_rows", None)
    return budget if settings == extra else None


def metric_by_seed(records, policy, dataset, select) -> dict[int, dict]:
    return {
        r["seed"]: r for r in records if r["policy"] == policy and r["dataset"] == dataset
        and select(r)
    }  # fmt: skip


def full_runs(records, dataset, extra=None):
    return metric_by_seed(records, "full", dataset, lambda r: r["settings"] == (extra or {}))


def mean_std(values: list[float]) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def change(runs: dict, reference: dict) -> str:
    """mean(policy) - mean(full) over the seeds both have, with the seed count."""
    seeds = sorted(set(runs) & set(reference))
    if not seeds:
        return ""
    delta = statistics.mean(runs[s]["metric"] - reference[s]["metric"] for s in seeds)
    ratio = statistics.mean(100 * runs[s]["backward_ratio"] for s in seeds)
    return f"{delta:+.2f} ({ratio:.1f}%, n={len(seeds)})"


def ratio_table(records: dict[str, list[dict]]) -> list[str]:
    lines = [
        "| protocol | dataset | " + " | ".join(f"b = {b:g}" for b in BUDGETS) + " |",
        "|---|---|" + "---|" * len(BUDGETS),
    ]
    for protocol, runs in records.items():
        for dataset in DATASETS:
            cells, seen = [], False
            for budget in BUDGETS:
                reached = [
                    100 * r["backward_ratio"] for r in runs
                    if r["dataset"] == dataset and default_budget(r, _recipe(r)) == budget
                ]  # fmt: skip
                seen |= bool(reached)
                span = f"{min(reached):.2f}–{max(reached):.2f}" if reached else ""
                cells.append(f"{span} ({len(reached)} runs)" if reached else "")
            if seen:
                lines.append(f"| {protocol} | {dataset} | " + " | ".join(cells) + " |")
    return lines


def _recipe(record: dict) -> dict:
    """The optimizer fields of a run's settings (a budget run under SGD is still a default)."""
    return {k: v for k, v in record["settings"].items() if k in ("optimizer", "lr")}


def accuracy_table(runs: list[dict]) -> list[str]:
    lines = [
        "| dataset | full Adam | tinypropv2 b = 0.2 | b = 0.1 | b = 0.05 | full SGD | "
        "tinypropv2 SGD b = 0.2 |",
        "|---|---|---|---|---|---|---|",
    ]
    for dataset in DATASETS:
        full = full_runs(runs, dataset)
        if not full:
            continue
        cells = [mean_std([r["metric"] for r in full.values()]) + f" (n={len(full)})"]
        for budget in (0.2, 0.1, 0.05):
            tp = metric_by_seed(
                runs, "tinypropv2", dataset, lambda r, b=budget: default_budget(r) == b
            )
            cells.append(change(tp, full))
        full_sgd = full_runs(runs, dataset, SGD)
        cells.append(mean_std([r["metric"] for r in full_sgd.values()]))
        tp_sgd = metric_by_seed(
            runs, "tinypropv2", dataset, lambda r: default_budget(r, SGD) == 0.2
        )
        cells.append(change(tp_sgd, full_sgd))
        name = f"{dataset} ({REAL[dataset]})" if dataset in REAL else dataset
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def equal_compute_table(runs: list[dict], budget: float) -> list[str]:
    """Each policy's metric at budget b, and which baselines tinypropv2 beats (by its mean
    over its seeds against theirs)."""
    lines = [
        "| dataset | full | " + " | ".join(POLICIES) + " |",
        "|---|---|" + "---|" * len(POLICIES),
    ]
    verdicts = {policy: {"beats": [], "ties": [], "loses to": []} for policy in POLICIES[1:]}
    for dataset in DATASETS:
        full = full_runs(runs, dataset)
        cells, means = [], {}
        for policy in POLICIES:
            held = metric_by_seed(runs, policy, dataset, lambda r: default_budget(r) == budget)
            if not held:
                cells.append("")
                continue
            reached = statistics.mean(100 * r["backward_ratio"] for r in held.values())
            means[policy] = statistics.mean(r["metric"] for r in held.values())
            metric = mean_std([r["metric"] for r in held.values()])
            cells.append(f"{metric} ({reached:.1f}%, n={len(held)})")
        if any(cells):
            reference = mean_std([r["metric"] for r in full.values()])
            lines.append(f"| {dataset} | {reference} | " + " | ".join(cells) + " |")
        for policy in verdicts:
            if "tinypropv2" in means and policy in means:
                gap = means["tinypropv2"] - means[policy]
                verdict = "beats" if gap > 0.005 else "loses to" if gap < -0.005 else "ties"
                verdicts[policy][verdict].append(dataset)
    said = [
        f"- tinypropv2 against {policy}: "
        + "; ".join(f"{k} on {len(v)} ({', '.join(v)})" for k, v in outcome.items() if v)
        for policy, outcome in verdicts.items()
        if any(outcome.values())
    ]
    return lines + ([""] + said if said else [])


SPARSE_OUTPUT = {"dense_output_layer": False}
ALL_ROWS = {"batch_norm_trained_rows": False}  # BatchNorm's backward means over every row
ALTERNATIVES = {
    "default": {},
    "BatchNorm means over every row (the previous defaults)": ALL_ROWS,
    "and a sparse output layer (the defaults before)": {**ALL_ROWS, **SPARSE_OUTPUT},
    "zeta=0.5, rows kept (earlier defaults)": {
        "zeta": 0.5, "drop_skipped_rows": False, **SPARSE_OUTPUT
    },
    "rows kept": {"drop_skipped_rows": False, **SPARSE_OUTPUT},
    "no skipping first (skip_split=0)": {"skip_split": 0.0, **ALL_ROWS, **SPARSE_OUTPUT},
    "skip_split=0.25": {"skip_split": 0.25},
    "skip_split=0.75": {"skip_split": 0.75},
    "zeta=0.9": {"zeta": 0.9},
    "dense_small_layers": {"dense_small_layers": True},
    "running_max_per_batch": {"running_max_per_batch": True},
    "mean_over_trained": {"mean_over_trained": True},
}  # fmt: skip
# the candidates under SGD-momentum, against full SGD
SGD_ALTERNATIVES = {
    "default": SGD,
    "skip_split=0.25": {"skip_split": 0.25, **SGD},
    "mean_over_trained": {"mean_over_trained": True, **SGD},
}  # fmt: skip
LEARNING_RATE = {"lr": 0.002}  # twice the plans' Adam rate of 1e-3
LEARNING_RATES = {  # label -> the optimizer fields of the runs (the plan's Adam rate: none)
    "Adam": {"plan": {}, "0.002": LEARNING_RATE, "0.0005": {"lr": 0.0005}},
    "SGD": {lr: {"optimizer": "sgd", "lr": float(lr)} for lr in ("0.005", "0.01", "0.05")},
}


def alternatives_table(
    runs: list[dict], budget: float = 0.2, alternatives=None, recipe=None
) -> list[str]:
    """Validation / test metric of each alternative (settings on top of the budget defaults,
    ``recipe``: the optimizer fields of the full run they are held against)."""
    alternatives = ALTERNATIVES if alternatives is None else alternatives
    lines = [
        "| dataset | full | " + " | ".join(alternatives) + " |",
        "|---|---|" + "---|" * len(alternatives),
    ]
    for dataset in DATASETS:
        cells = []
        for extra in alternatives.values():
            if extra == ALL_ROWS and dataset not in BATCH_NORM:  # the default's runs again
                cells.append("")
                continue
            held = metric_by_seed(
                runs, "tinypropv2", dataset, lambda r, e=extra: default_budget(r, e) == budget
            )
            values = [(r["val_metric"], r["metric"]) for r in held.values()]
            cells.append(
                f"{statistics.mean(v for v, _ in values):.2f} / "
                f"{statistics.mean(t for _, t in values):.2f} "
                f"(n={len(values)}: {', '.join(f'{t:.2f}' for _, t in values)})"
                if values else ""
            )  # fmt: skip
        if sum(bool(c) for c in cells) > 1:
            reference = full_runs(runs, dataset, recipe)
            val = statistics.mean(r["val_metric"] for r in reference.values())
            test = statistics.mean(r["metric"] for r in reference.values())
            lines.append(f"| {dataset} | {val:.2f} / {test:.2f} | " + " | ".join(cells) + " |")
    return lines


def learning_rate_table(runs: list[dict], budget: float = 0.2) -> list[str]:
    """Full and the budget default at each learning rate run (Adam: the plan's and
    LEARNING_RATE; SGD-momentum: 0.005, 0.01, 0.05): validation / test means, the rate each
    chooses on validation, and the test change of the budget run against full when both use
    the rate they chose (mean over the common seeds)."""
    lines = [
        "| dataset | optimizer | full, per lr | tinypropv2, per lr "
        "| chosen on validation (full, tinypropv2) | change, chosen |",
        "|---|---|---|---|---|---|",
    ]
    for dataset in DATASETS:
        for optimizer, recipes in LEARNING_RATES.items():
            full = {lr: full_runs(runs, dataset, recipe) for lr, recipe in recipes.items()}
            held = {
                lr: metric_by_seed(
                    runs, "tinypropv2", dataset, lambda r, e=recipe: default_budget(r, e) == budget
                )
                for lr, recipe in recipes.items()
            }  # fmt: skip
            full = {lr: by_seed for lr, by_seed in full.items() if by_seed}
            held = {lr: by_seed for lr, by_seed in held.items() if by_seed}
            if len(full) < 2 or len(held) < 2:
                continue

            def cells(options):
                return "; ".join(
                    f"{lr}: {statistics.mean(r['val_metric'] for r in by_seed.values()):.2f} / "
                    f"{statistics.mean(r['metric'] for r in by_seed.values()):.2f}"
                    for lr, by_seed in options.items()
                )

            def chosen(options):
                return max(options, key=lambda k: statistics.mean(
                    r["val_metric"] for r in options[k].values()))  # fmt: skip

            full_rate, held_rate = chosen(full), chosen(held)
            lines.append(
                f"| {dataset} | {optimizer} | {cells(full)} | {cells(held)} | "
                f"{full_rate}, {held_rate} | {change(held[held_rate], full[full_rate])} |"
            )
    return lines


def curve_table(runs: list[dict], largest: float = 0.3) -> list[str]:
    """The budget default's validation / test change against full at every budget run, on the
    datasets that were also run at ``largest`` (mean over the seeds both have)."""
    budgets = [b for b in BUDGETS if b >= 0.1]
    lines = [
        "| dataset | " + " | ".join(f"b = {b:g}" for b in budgets) + " |",
        "|---|" + "---|" * len(budgets),
    ]
    for dataset in DATASETS:
        full = full_runs(runs, dataset)
        cells = []
        for budget in budgets:
            held = metric_by_seed(
                runs, "tinypropv2", dataset, lambda r, b=budget: default_budget(r) == b
            )
            seeds = sorted(set(held) & set(full))
            if not seeds:
                cells.append("")
                continue
            val = statistics.mean(held[s]["val_metric"] - full[s]["val_metric"] for s in seeds)
            test = statistics.mean(held[s]["metric"] - full[s]["metric"] for s in seeds)
            cells.append(f"{val:+.2f} / {test:+.2f} (n={len(seeds)})")
        if cells[-1]:
            lines.append(f"| {dataset} | " + " | ".join(cells) + " |")
    return lines


def more_seeds_table(runs: list[dict], dataset: str = "cifar10") -> list[str]:
    """Full and the budget default (Adam and SGD-momentum) on every seed run: the change per
    seed, its mean over seeds 0-2 and over every seed both have."""
    lines = [
        "| optimizer | change per seed (full → tinypropv2 b = 0.2) | mean, seeds 0–2 | mean, all |",
        "|---|---|---|---|",
    ]
    for name, recipe in (("Adam", {}), ("SGD-momentum", SGD)):
        full = full_runs(runs, dataset, recipe)
        held = metric_by_seed(
            runs, "tinypropv2", dataset, lambda r, e=recipe: default_budget(r, e) == 0.2
        )
        seeds = sorted(set(full) & set(held))
        if not seeds or max(seeds) <= 2:
            continue
        each = {s: held[s]["metric"] - full[s]["metric"] for s in seeds}
        per_seed = ", ".join(
            f"{s}: {full[s]['metric']:.2f} → {held[s]['metric']:.2f} ({each[s]:+.2f})"
            for s in seeds
        )
        first = [each[s] for s in seeds if s <= 2]
        lines.append(
            f"| {name} | {per_seed} | {statistics.mean(first):+.2f} | "
            f"{statistics.mean(each.values()):+.2f} ± {statistics.stdev(each.values()):.2f} "
            f"(n={len(seeds)}) |"
        )
    return lines


# two-sided 95% quantile of Student's t with n - 1 degrees of freedom (n seeds)
T95 = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36, 9: 2.31, 10: 2.26}


def interval(values: list[float]) -> str:
    """mean ± std [95% confidence interval of the mean] of paired differences."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return f"{mean:+.2f}"
    std = statistics.stdev(values)
    half = T95.get(len(values), 2.0) * std / len(values) ** 0.5
    return f"{mean:+.2f} ± {std:.2f} [{mean - half:+.2f}, {mean + half:+.2f}]"


def _recipe_of(settings: dict) -> dict:
    """The optimizer fields of a run's settings (none: Adam at the plan's rate)."""
    return {key: settings[key] for key in ("lr", "optimizer") if key in settings}


def one_machine_table(runs: list[dict]) -> list[str]:
    """Every ``tinypropv2`` setting of a folder of runs made on one machine against full's
    runs of the same folder with the same optimizer and learning rate, seed by seed:
    validation and test change (mean ± std [95% CI]), and the validation change against the
    budget default's with that optimizer and rate (which the settings are chosen on), with the
    backward % reached."""
    lines = [
        "| dataset | setting | seeds | validation change | test change | validation vs "
        "default | backward % |",
        "|---|---|---|---|---|---|---|",
    ]
    for dataset in DATASETS:
        settings = {
            r["settings_label"]: r["settings"] for r in runs
            if r["dataset"] == dataset and r["policy"] == "tinypropv2"
        }  # fmt: skip
        for label in sorted(
            settings, key=lambda label: (sorted(_recipe_of(settings[label]).items()), label)
        ):
            recipe = _recipe_of(settings[label])
            full = full_runs(runs, dataset, recipe)
            default = metric_by_seed(
                runs,
                "tinypropv2",
                dataset,
                lambda r, e=recipe: r["settings"] == {"budget": 0.2, **e},
            )
            held = metric_by_seed(
                runs, "tinypropv2", dataset, lambda r, t=label: r["settings_label"] == t
            )
            seeds = sorted(set(held) & set(full))
            if not seeds:
                continue
            val = [held[s]["val_metric"] - full[s]["val_metric"] for s in seeds]
            test = [held[s]["metric"] - full[s]["metric"] for s in seeds]
            paired = sorted(set(seeds) & set(default))
            against = (
                interval([held[s]["val_metric"] - default[s]["val_metric"] for s in paired])
                if settings[label] != {"budget": 0.2, **recipe} and paired else ""
            )  # fmt: skip
            ratios = [100 * held[s]["backward_ratio"] for s in seeds]
            lines.append(
                f"| {dataset} | {label} | {len(seeds)} | {interval(val)} | {interval(test)} | "
                f"{against} | {min(ratios):.2f}–{max(ratios):.2f} |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="benchmarks/results")
    args = parser.parse_args()
    every_seed = {
        protocol: load(os.path.join(args.results, f"budget-{protocol}"))
        for protocol in ("finetune", "scratch")
    }
    records = {  # the tables are over seeds 0-2; more seeds only in their own table
        protocol: [r for r in runs if r["seed"] in SEEDS] for protocol, runs in every_seed.items()
    }
    one_machine = load(os.path.join(args.results, "budget-schedule"))  # every seed run
    sections = [
        ("Backward ratio reached, % of full (lowest–highest over policies, optimizers, seeds)",
         ratio_table(records)),
        ("Finetune: test metric change against full (mean over common seeds)",
         accuracy_table(records["finetune"])),
        ("Scratch: test metric change against full", accuracy_table(records["scratch"])),
        *((f"Equal compute, {protocol}, b = {budget:g}: test metric (backward % reached)",
           equal_compute_table(records[protocol], budget))
          for protocol in ("finetune", "scratch") for budget in (0.2, 0.1, 0.05)),
        *((f"Alternatives at b = {budget:g}, {protocol}: validation / test metric",
           alternatives_table(records[protocol], budget))
          for protocol in ("finetune", "scratch") for budget in (0.2, 0.1)),
        ("Alternatives at b = 0.2, finetune, SGD-momentum (lr 0.01): validation / test metric",
         alternatives_table(records["finetune"], 0.2, SGD_ALTERNATIVES, SGD)),
        ("Learning rate chosen on validation, finetune, b = 0.2: validation / test metric",
         learning_rate_table(records["finetune"])),
        ("How much backward, finetune: validation / test change against full",
         curve_table(records["finetune"])),
        ("More seeds, finetune, cifar10 stand-in (ResNet-8), b = 0.2: test accuracy",
         more_seeds_table(every_seed["finetune"])),
        ("One machine, finetune, seeds as run: change against full, mean ± std [95% CI]",
         one_machine_table(one_machine)),
        ("One machine, finetune: learning rate chosen on validation, b = 0.2",
         learning_rate_table(one_machine)),
    ]  # fmt: skip
    for title, lines in sections:
        if len(lines) <= 2:  # a header without rows: no records for it yet
            continue
        print(f"### {title}\n")
        print("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
