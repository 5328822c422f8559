"""``tinyprop bench``: run datasets x policies x settings x seeds under a protocol, one JSON
record per run, locally or as Ray tasks; finished runs are skipped (resume).

Examples:
    tinyprop bench --suite small --protocol finetune
    tinyprop bench --suite small --datasets mnist har --policies full tinypropv2 --seeds 0
    tinyprop bench --suite small --protocol scratch --ray local      # two runs at a time
    tinyprop bench --suite paper --ray HEAD_HOST:6379                # a running Ray cluster
    tinyprop bench --suite small --list          # show the planned runs and what is done
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

import tinyprop
from tinyprop import cli_types, models
from tinyprop.bench import claims, protocols, sources, store, suites
from tinyprop.bench.cluster import CONNECT_TIMEOUT_S, RayConnectionError
from tinyprop.bench.suites import DatasetPlan
from tinyprop.bench.training import evaluate, pretrain_dense, train_policy
from tinyprop.optim import OPTIMIZERS

# settings keys that set the training recipe, not the TinyPropConfig: the optimizer (adam by
# default) and its learning rate (the plan's by default), so both can be chosen on validation
RECIPE_KEYS = ("optimizer", "lr")


def config_settings(settings: dict) -> dict:
    """The TinyPropConfig fields of a settings dict (without :data:`RECIPE_KEYS`)."""
    return {key: value for key, value in settings.items() if key not in RECIPE_KEYS}


def run_fields(settings: dict, run_steps: int) -> dict:
    """The TinyPropConfig fields of a run of ``run_steps`` optimizer steps: a
    ``budget_schedule`` without ``budget_steps`` gets the run's length (the settings label
    stays as given)."""
    fields = config_settings(settings)
    if fields.get("budget_schedule") and fields.get("budget_steps") is None:
        fields["budget_steps"] = run_steps
    return fields


def run_config(spec: RunSpec, train_samples: int) -> tinyprop.TinyPropConfig:
    """The run's TinyPropConfig (``train_samples`` on-device: epochs x batches steps)."""
    batches = -(-train_samples // spec.plan.batch_size)  # the last batch may be smaller
    fields = run_fields(spec.settings, spec.plan.epochs * batches)
    return tinyprop.TinyPropConfig(policy=spec.policy, seed=spec.seed, **fields)


def check_recipe(settings: dict) -> None:
    """A clear error for an unknown optimizer or a bad learning rate in a settings dict."""
    if settings.get("optimizer", "adam") not in OPTIMIZERS:
        raise ValueError(
            f"unknown optimizer {settings['optimizer']!r}; choose one of {', '.join(OPTIMIZERS)}"
        )
    lr = settings.get("lr", 1.0)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr must be a positive number, got {lr!r}")


@dataclass(frozen=True)
class RunSpec:
    """Everything one run needs (picklable, so it can travel to a Ray worker)."""

    suite: str
    dataset: str
    policy: str
    settings: dict = field(hash=False)
    protocol: str = "scratch"
    seed: int = 0
    plan: DatasetPlan = DatasetPlan(None, None, 1, 1)
    val_fraction: float = 0.1
    pretrain_fraction: float = 0.5
    results: str = "."
    min_val_samples: int = 0
    data_dir: str | None = None
    commit: str | None = None
    threads: int = 1

    @property
    def settings_label(self) -> str:
        """Short label of the settings, e.g. ``ratio=0.1``."""
        return suites.settings_label(self.settings)

    @property
    def path(self) -> Path:
        """Where this run's record is written."""
        name = store.record_name(
            self.protocol, self.dataset, self.policy, self.settings_label, self.seed
        )
        return Path(self.results) / name

    @property
    def title(self) -> str:
        """One-line description for progress bars."""
        return f"{self.dataset} {self.policy} {self.settings_label} seed{self.seed}"


def plan_runs(
    suite: suites.Suite,
    protocol: str,
    results: str,
    datasets: list[str] | None = None,
    policies: list[str] | None = None,
    seeds: list[int] | None = None,
    max_settings: int | None = None,
    data_dir: str | None = None,
    commit: str | None = None,
    threads: int = 1,
    labels: list[str] | None = None,
) -> list[RunSpec]:
    """All runs of a suite (datasets x policies x settings x seeds), each config validated.

    Args:
        suite: the suite (sizes and settings grids).
        protocol: ``"scratch"`` or ``"finetune"``.
        results: folder of the records.
        datasets: a subset of the suite's datasets (default: all).
        policies: a subset of the suite's policies (default: all).
        seeds: the seeds (default: the suite's).
        max_settings: keep only the first N settings of each policy's grid.
        data_dir: folder of the real datasets.
        commit: the checkout's commit written into every record (None outside a checkout).
        threads: torch threads per run.
        labels: keep only the settings with these labels (:func:`suites.settings_label`, e.g.
            ``budget=0.2,lr=0.01,optimizer=sgd``; ``default`` for ``{}``), after
            ``max_settings``; a label no policy of the run has is an error.

    Returns:
        The runs in order: dataset, seed, policy, setting.

    Example:
        >>> len(plan_runs(suites.get("tiny"), "scratch", "/tmp/r"))
        12
    """
    if protocol not in protocols.PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {protocols.PROTOCOLS}")
    datasets = list(suite.datasets) if datasets is None else datasets
    policies = list(suite.settings) if policies is None else policies
    seeds = list(suite.seeds) if seeds is None else seeds
    for name in datasets:
        if name not in suite.datasets:
            raise ValueError(
                f"dataset {name!r} is not in suite {suite.name!r}; choose from "
                f"{list(suite.datasets)}"
            )
    for policy in policies:
        if policy not in suite.settings:
            raise ValueError(f"unknown policy {policy!r}; choose from {list(suite.settings)}")
    grids = {policy: suite.settings[policy][:max_settings] for policy in policies}
    if labels is not None:
        grids = {
            policy: [each for each in grid if suites.settings_label(each) in labels]
            for policy, grid in grids.items()
        }
        known = {suites.settings_label(each) for grid in grids.values() for each in grid}
        for label in labels:
            if label not in known:
                raise ValueError(
                    f"no policy of the run has the setting {label!r}; see the labels with "
                    f"--list (without --settings)"
                )
    runs = []
    for dataset in datasets:
        for seed in seeds:
            for policy in policies:
                for settings in grids[policy]:
                    check_recipe(settings)
                    # checked before any run starts; the run's length is known when it runs
                    tinyprop.TinyPropConfig(policy=policy, seed=seed, **run_fields(settings, 1))
                    runs.append(
                        RunSpec(
                            suite=suite.name,
                            dataset=dataset,
                            policy=policy,
                            settings=dict(settings),
                            protocol=protocol,
                            seed=seed,
                            plan=suite.datasets[dataset],
                            val_fraction=suite.val_fraction,
                            pretrain_fraction=suite.pretrain_fraction,
                            results=str(results),
                            min_val_samples=suite.min_val_samples,
                            data_dir=data_dir,
                            commit=commit,
                            threads=threads,
                        )  # fmt: skip
                    )
    return runs


def prepare(spec: RunSpec):
    """Load the data, cut the splits (the validation split topped up to ``min_val_samples``
    from training data outside the capped pool, when there is some), standardise the inputs if
    the plan says so (statistics of the pretraining part under finetune, of the training part
    under scratch), build the fresh model (seeded)."""
    plan = spec.plan
    pool = sources.load(spec.dataset, "train", plan.train_samples, spec.data_dir, plan.data_options)
    test = sources.load(spec.dataset, "test", plan.test_samples, spec.data_dir, plan.data_options)
    splits = protocols.split_pool(
        len(pool.y), spec.protocol, spec.seed, spec.val_fraction, spec.pretrain_fraction
    )
    if spec.min_val_samples > len(splits.val):
        extra = sources.outside_pool(
            spec.dataset, "train", plan.train_samples, spec.min_val_samples - len(splits.val),
            spec.seed, spec.data_dir, plan.data_options,
        )  # fmt: skip
        if len(extra.y):
            start = len(pool.y)
            pool = replace(pool, x=torch.cat([pool.x, extra.x]), y=torch.cat([pool.y, extra.y]))
            added = torch.arange(start, start + len(extra.y))
            splits = replace(splits, val=torch.cat([splits.val, added]))
    if plan.standardize == "last_axis":
        reference = splits.pretrain if spec.protocol == "finetune" else splits.train
        pool, test = sources.standardize_last_axis(pool.x[reference], pool, test)
    elif plan.standardize is not None:
        raise ValueError(
            f"unknown standardize {plan.standardize!r} in the plan of {spec.dataset!r}; choose "
            f"one of {suites.STANDARDIZE}"
        )
    model_dataset = sources.model_dataset(spec.dataset)
    torch.manual_seed(spec.seed)
    model = models.build(
        model_dataset,
        num_classes=pool.num_classes,
        input_shape=pool.input_shape,
        variant=spec.plan.variant,
    )
    return pool, test, splits, model_dataset, model


def pretrained_state(spec: RunSpec) -> dict[str, torch.Tensor]:
    """The ``finetune`` protocol's pretrained weights for ``spec``'s dataset and seed: loaded from
    ``cache_dir()/pretrained`` or trained (dense) and cached. The same for every policy."""
    from tinyprop.data import cache_dir

    torch.set_num_threads(spec.threads)
    pool, _, splits, model_dataset, model = prepare(spec)
    reference = models.reference(model_dataset, spec.plan.variant)
    key = protocols.pretrain_key(
        spec.dataset, pool.source, reference.model_name, spec.plan, seed=spec.seed,
        val_fraction=spec.val_fraction, pretrain_fraction=spec.pretrain_fraction,
        input_shape=pool.input_shape, num_classes=pool.num_classes,
    )  # fmt: skip
    path = cache_dir() / "pretrained" / f"{spec.dataset}-seed{spec.seed}-{key}.pt"
    state = protocols.load_pretrained(path)  # None when absent, damaged or changed: trained again
    if state is not None:
        return state
    pretrain_dense(
        model,
        pool.x[splits.pretrain],
        pool.y[splits.pretrain],
        epochs=spec.plan.pretrain_epochs,
        batch_size=spec.plan.batch_size,
        lr=spec.plan.lr,
        seed=spec.seed + 1000,
        autoencoder=models.is_autoencoder(model_dataset),
    )
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    protocols.save_pretrained(state, path)
    return state


def execute_run(
    spec: RunSpec,
    pretrained: dict[str, torch.Tensor] | None = None,
    write: bool = True,
    save_model: str | None = None,
) -> dict:
    """Run one benchmark run and write its record.

    Args:
        spec: the run.
        pretrained: the pretrained weights (finetune); computed or loaded when None.
        write: write the record to ``spec.path``.
        save_model: also save the trained model's ``state_dict`` to this path (plain PyTorch
            keys, for ``tinyprop export --model DATASET``).

    Returns:
        The record (also written to ``spec.path``).
    """
    start = time.perf_counter()
    torch.set_num_threads(spec.threads)
    pool, test, splits, model_dataset, model = prepare(spec)
    autoencoder = models.is_autoencoder(model_dataset)
    pretrained_metric = None
    if spec.protocol == "finetune":
        model.load_state_dict(pretrained if pretrained is not None else pretrained_state(spec))
        pretrained_metric = evaluate(model, test.x, test.y, autoencoder)[1]
    config = run_config(spec, len(splits.train))
    optimizer = spec.settings.get("optimizer", "adam")
    lr = spec.settings.get("lr", spec.plan.lr)
    result = train_policy(
        model,
        config,
        pool.x[splits.train],
        pool.y[splits.train],
        epochs=spec.plan.epochs,
        batch_size=spec.plan.batch_size,
        lr=lr,
        seed=spec.seed + 2000,
        autoencoder=autoencoder,
        optimizer=optimizer,
    )
    val_metric_name, val_metric = evaluate(
        model, pool.x[splits.val], pool.y[splits.val], autoencoder
    )
    metric_name, metric = evaluate(model, test.x, test.y, autoencoder)
    if save_model:
        protocols.save_state(model.state_dict(), Path(save_model).resolve())
    record = {
        "dataset": spec.dataset,
        "source": pool.source,
        "model": models.reference(model_dataset, spec.plan.variant).model_name,
        "input_shape": list(pool.input_shape),
        "num_classes": pool.num_classes,
        "policy": spec.policy,
        "settings": dict(spec.settings),
        "settings_label": spec.settings_label,
        "protocol": spec.protocol,
        "seed": spec.seed,
        "suite": spec.suite,
        "metric_name": metric_name,
        "metric": metric,
        "val_metric_name": val_metric_name,
        "val_metric": val_metric,
        "pretrained_metric": pretrained_metric,
        "compute_ratio": result.ledger.ratio(),
        "backward_ratio": result.ledger.backward_ratio(),
        "skip_rate": result.skip_rate,
        "ledger": result.ledger.as_dict(),
        "trained_samples": result.trained,
        "skipped_samples": result.skipped,
        "optimizer_batches": result.steps,
        "final_loss": result.last_loss,
        "epochs": spec.plan.epochs,
        "batch_size": spec.plan.batch_size,
        "plan": _as_json(asdict(spec.plan)),
        "lr": lr,
        "optimizer": optimizer,
        "train_samples": len(splits.train),
        "val_samples": len(splits.val),
        "pretrain_samples": len(splits.pretrain),
        "test_samples": len(test.y),
        "train_wall_s": result.wall_s,
        "wall_s": time.perf_counter() - start,
        "commit": spec.commit,
        "tinyprop_version": tinyprop.__version__,
        "attempts": 1,  # the Ray driver sets these when a run needed more than one
        "retried_errors": [],
        "torch": torch.__version__,
    }
    if write:
        store.write_record(spec.path, record)
    return record


def run_local(runs: list[RunSpec], elsewhere: list[str] | None = None) -> list[str]:
    """Run ``runs`` one after another in this process; returns the titles of failed runs.
    Runs another process claimed or finished meanwhile are left to it (titles added to
    ``elsewhere``)."""
    elsewhere = [] if elsewhere is None else elsewhere
    failures = []
    pretrained: dict[tuple[str, int], dict] = {}
    with tqdm(total=len(runs), unit="run", dynamic_ncols=True) as bar:
        for spec in runs:
            bar.set_description(spec.title)
            if not claims.try_claim(spec.path):  # another bench process on this folder runs it
                tqdm.write(f"run {spec.title}: {claims.describe_holder(spec.path)}")
                elsewhere.append(spec.title)
                bar.update(1)
                continue
            try:
                if store.load_record(spec.path)[0] is not None:
                    elsewhere.append(spec.title)  # finished by another process meanwhile
                    continue
                state = None
                if spec.protocol == "finetune":
                    key = (spec.dataset, spec.seed)
                    if key not in pretrained:
                        pretrained = {key: pretrained_state(spec)}  # keep one dataset's weights
                    state = pretrained[key]
                record = execute_run(spec, state)
                bar.set_postfix_str(f"{record['metric_name']} {record['metric']:.1f}")
            except Exception:  # one failed run must not stop the suite
                failures.append(spec.title)
                tqdm.write(f"run {spec.title} failed:\n{traceback.format_exc()}")
            finally:
                claims.release(spec.path)
                bar.update(1)
    return failures


def run_ray(runs: list[RunSpec], address: str = "local", retries: int = 2) -> list[str]:
    """Run each run as a Ray task; see :func:`tinyprop.bench.cluster.run_ray`."""
    from tinyprop.bench import cluster

    return cluster.run_ray(runs, address, retries)


def _as_json(value):
    """``value`` as it reads back from a JSON record (tuples become lists)."""
    return json.loads(json.dumps(value))


def other_configuration(spec: RunSpec, record: dict) -> str | None:
    """What in ``spec``'s finished ``record`` says it was trained in another configuration
    (another suite's epochs, batch size, learning rate, optimizer, settings or dataset plan,
    e.g. a ``--suite small`` folder given to ``--suite paper``), or None. Only the entries the
    record holds are compared (older records have no ``plan``). Taken as done, such a record
    was reported as this suite's run, silently."""
    expected = {
        "settings": _as_json(spec.settings),
        "epochs": spec.plan.epochs,
        "batch_size": spec.plan.batch_size,
        "lr": spec.settings.get("lr", spec.plan.lr),
        "optimizer": spec.settings.get("optimizer", "adam"),
        "plan": _as_json(asdict(spec.plan)),
    }
    differing = [
        f"{key} {record[key]!r} (this run: {value!r})"
        for key, value in expected.items()
        if key in record and record[key] != value
    ]
    return ", ".join(differing) or None


def check_same_configuration(runs: list[RunSpec]) -> None:
    """Raise ValueError naming the records of ``runs`` that another configuration wrote into
    this results folder (:func:`other_configuration`), before any run starts: resumed, they
    were counted as done and reported as this configuration's runs."""
    others = []
    for spec in runs:
        record, _ = store.load_record(spec.path)
        difference = None if record is None else other_configuration(spec, record)
        if difference is not None:
            others.append((spec.path, difference))
    if others:
        path, difference = others[0]
        raise ValueError(
            f"{path.parent} holds {len(others)} records of another configuration than these "
            f"runs (e.g. {path.name}: {difference}); give this configuration a results folder "
            "of its own (--results), or move those records away to run them again"
        )


def _finished(spec: RunSpec, say: bool = False) -> bool:
    """Whether ``spec``'s record is there and valid; ``say`` prints why an existing one is not
    (unreadable, truncated, incomplete: the run is done again)."""
    record, problem = store.load_record(spec.path)
    if say and record is None and problem != "missing":
        print(f"record {spec.path}: {problem}; running {spec.title} again")
    return record is not None


def _run_ray_claimed(
    runs: list[RunSpec],
    address: str,
    elsewhere: list[str],
    retries: int = 2,
    timeout: float = CONNECT_TIMEOUT_S,
) -> list[str]:
    """Ray runs (:func:`tinyprop.bench.cluster.run_ray`) of the runs no other process has
    claimed, holding their claims."""
    from tinyprop.bench import cluster

    mine = [spec for spec in runs if claims.try_claim(spec.path)]
    for spec in runs:
        if spec not in mine:
            print(f"run {spec.title}: {claims.describe_holder(spec.path)}")
            elsewhere.append(spec.title)
    try:
        return cluster.run_ray(mine, address, retries, timeout) if mine else []
    finally:
        for spec in mine:
            claims.release(spec.path)


def build_parser() -> argparse.ArgumentParser:
    """The ``tinyprop bench`` flags."""
    parser = argparse.ArgumentParser(
        prog="tinyprop bench",
        description="Run a benchmark suite: datasets x policies x settings x seeds. One JSON "
        "record per run in the results folder; finished runs are skipped (resume).",
    )
    parser.add_argument(
        "--suite", default="small", choices=list(suites.SUITES), help="(default small)"
    )
    parser.add_argument(
        "--protocol", default="finetune", choices=protocols.PROTOCOLS, help="(default finetune)"
    )
    parser.add_argument("--datasets", nargs="+", help="subset of the suite's datasets")
    parser.add_argument("--policies", nargs="+", help="subset of " + ", ".join(suites.POLICIES))
    parser.add_argument(
        "--seeds", nargs="+", type=cli_types.seed, help="seeds (default: the suite's)"
    )
    parser.add_argument(
        "--max-settings", type=cli_types.positive_int, help="first N settings of each policy only"
    )
    parser.add_argument(
        "--settings",
        nargs="+",
        metavar="LABEL",
        help="only the settings with these labels, e.g. budget=0.2 or "
        "budget=0.2,lr=0.01,optimizer=sgd (default: every setting; --list shows the labels)",
    )
    parser.add_argument(
        "--results",
        help="results folder (default results/SUITE-PROTOCOL in the current folder; the "
        "committed records are in benchmarks/results/)",
    )
    parser.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="run the runs as Ray tasks: 'local' starts a private Ray instance for this sweep "
        "(never an existing one); HOST:PORT or ray://HOST:PORT joins a running cluster",
    )
    parser.add_argument(
        "--retries", type=int, default=2, help="with --ray: tries again per failed run"
    )
    parser.add_argument(
        "--ray-timeout",
        type=float,
        default=CONNECT_TIMEOUT_S,
        help=f"with --ray ADDRESS: seconds to wait for the cluster (default {CONNECT_TIMEOUT_S:g})",
    )
    parser.add_argument("--data-dir", help="folder of the real datasets (else offline sources)")
    parser.add_argument(
        "--threads", type=cli_types.thread_count, default=1, help="torch threads per run"
    )
    parser.add_argument("--list", action="store_true", help="print the planned runs and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``tinyprop bench``; returns the exit code."""
    args = build_parser().parse_args(argv)
    suite = suites.get(args.suite)
    # absolute paths: Ray workers run in folders of their own
    results = str(Path(args.results or f"results/{suite.name}-{args.protocol}").resolve())
    data_dir = str(Path(args.data_dir).expanduser().resolve()) if args.data_dir else None
    try:
        if not args.list:
            store.check_writable(results)  # before any run: no finished work lost to it
    except OSError as error:
        print(f"tinyprop bench: {error}", file=sys.stderr)
        return 2
    try:
        runs = plan_runs(
            suite, args.protocol, results, args.datasets, args.policies, args.seeds,
            args.max_settings, data_dir, store.commit_hash(), args.threads, args.settings,
        )  # fmt: skip
        check_same_configuration(runs)
    except (ValueError, TypeError) as error:
        print(f"tinyprop bench: {error}", file=sys.stderr)
        return 2
    todo = [spec for spec in runs if not _finished(spec, say=not args.list)]
    print(
        f"suite {suite.name}, protocol {args.protocol}: {len(runs)} runs, "
        f"{len(runs) - len(todo)} already done, {len(todo)} to run; records in {results}"
    )
    if args.list:
        for spec in runs:
            print(("todo  " if spec in todo else "done  ") + spec.title)
        return 0
    if not todo:
        return 0
    start = time.perf_counter()
    elsewhere: list[str] = []  # runs another process on this folder claimed
    try:
        if args.ray:
            failures = _run_ray_claimed(todo, args.ray, elsewhere, args.retries, args.ray_timeout)
        else:
            failures = run_local(todo, elsewhere)
    except RayConnectionError as error:
        print(f"tinyprop bench: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        left = sum(not _finished(spec) for spec in todo)
        print(
            f"\ninterrupted: {len(todo) - left} of {len(todo)} runs finished and kept, {left} "
            "left; the same command resumes without redoing finished runs",
            file=sys.stderr,
        )
        return 130
    finished = len(todo) - len(failures) - len(elsewhere)
    print(
        f"{finished} runs finished in {time.perf_counter() - start:.0f} s"
        + (f"; {len(elsewhere)} left to another process on {results}" if elsewhere else "")
    )
    if failures:
        print(f"{len(failures)} runs failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0
