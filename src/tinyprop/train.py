"""``tinyprop train``: train one dataset's reference model with one policy; print the metric and
the compute ledger's ratios.

Examples:
    tinyprop train --dataset mnist --policy tinypropv2 --epochs 3
    tinyprop train --dataset har --policy topk --ratio 0.1 --protocol finetune --seed 1
    tinyprop train --dataset cifar10 --policy tinyprop --zeta 1.0 --train-samples 5000
    tinyprop train --dataset mnist --policy tinypropv2 --budget 0.1   # 10% of full's backward
    tinyprop train --dataset mnist --policy topk --budget 0.1 --unified  # meProp's unified top-k
    tinyprop train --dataset har --protocol finetune --save har.pt   # then tinyprop export
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from tinyprop import cli_types, models
from tinyprop.bench import protocols, runner, sources, store, suites

CONFIG_FLAGS = (
    "ratio", "s_min", "s_max", "zeta", "d_min", "d_max", "beta", "skip_threshold", "budget",
)  # fmt: skip


def dataset_names() -> list[str]:
    """Every dataset ``tinyprop train`` has a plan for: the models' datasets, then the tiny
    synthetic ones of ``--suite tiny``."""
    planned = {name for suite in suites.SUITES.values() for name in suite.datasets}
    return [name for name in models.names() if name in planned] + sorted(
        planned - set(models.names())
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``tinyprop train`` flags."""
    parser = argparse.ArgumentParser(
        prog="tinyprop train",
        description="Train one dataset's reference model with one policy. Sizes default to\n"
        "the chosen suite's plan for the dataset (--suite small).",
        epilog="examples:\n" + __doc__.split("Examples:\n")[1].rstrip(),  # the docstring's
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dataset", required=True, help=f"one of {', '.join(dataset_names())}")
    parser.add_argument(
        "--policy", default="tinypropv2", choices=suites.POLICIES, help="(default tinypropv2)"
    )
    parser.add_argument(
        "--protocol",
        default="scratch",
        choices=protocols.PROTOCOLS,
        help="(default scratch; tinyprop bench's is finetune)",
    )
    parser.add_argument(
        "--suite",
        default="small",
        choices=list(suites.SUITES),
        help="whose plan gives the sizes (default small)",
    )
    parser.add_argument(
        "--epochs", type=cli_types.epoch_count, help="epochs (default: the suite's)"
    )
    parser.add_argument(
        "--pretrain-epochs",
        type=cli_types.pretrain_epoch_count,
        help="finetune: dense pretraining epochs",
    )
    parser.add_argument("--seed", type=cli_types.seed, default=0, help="(default 0)")
    parser.add_argument("--batch-size", type=cli_types.positive_int)
    parser.add_argument("--lr", type=cli_types.positive_float, help="Adam learning rate")
    parser.add_argument(
        "--train-samples", type=cli_types.positive_int, help="cap on the training pool"
    )
    parser.add_argument("--test-samples", type=cli_types.positive_int, help="cap on the test split")
    parser.add_argument("--variant", help="model variant, e.g. cnn for mnist")
    parser.add_argument("--data-dir", help="folder of the real datasets (else offline sources)")
    parser.add_argument("--threads", type=cli_types.thread_count, default=1, help="torch threads")
    parser.add_argument("--record", metavar="PATH", help="also write the run record as JSON")
    parser.add_argument(
        "--save",
        metavar="MODEL.pt",
        help="save the trained state_dict (then: tinyprop export MODEL.pt --model DATASET)",
    )
    for name in CONFIG_FLAGS:
        parser.add_argument(f"--{name.replace('_', '-')}", type=cli_types.finite_float, dest=name,
                            help=f"TinyPropConfig.{name}")  # fmt: skip
    parser.add_argument(
        "--unified", action="store_true", help="meProp's unified top-k (TinyPropConfig.unified)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``tinyprop train``; returns the exit code."""
    args = build_parser().parse_args(argv)
    suite = suites.get(args.suite)
    # the chosen suite's plan for the dataset, else the small suite's, else any suite's (the
    # budget suite's fashion_mnist and digits, the tiny suite's: a KeyError traceback before)
    plan = next(
        (
            candidate.datasets[args.dataset]
            for candidate in (suite, suites.SMALL, *suites.SUITES.values())
            if args.dataset in candidate.datasets
        ),
        None,
    )
    if plan is None:
        print(f"tinyprop train: unknown dataset {args.dataset!r}; choose one of "
              f"{', '.join(dataset_names())}", file=sys.stderr)  # fmt: skip
        return 2
    changes = {
        "epochs": args.epochs, "pretrain_epochs": args.pretrain_epochs,
        "batch_size": args.batch_size, "lr": args.lr, "train_samples": args.train_samples,
        "test_samples": args.test_samples, "variant": args.variant,
    }  # fmt: skip
    plan = dataclasses.replace(plan, **{k: v for k, v in changes.items() if v is not None})
    settings = {
        name: getattr(args, name) for name in CONFIG_FLAGS if getattr(args, name) is not None
    }
    if args.unified:
        settings["unified"] = True
    try:
        # before training, so the run is not lost to an unwritable path, and no device file
        # (/dev/null) is replaced by the rename that writes these files
        if args.record:
            store.check_output_file(args.record, "--record")
        if args.save:
            store.check_output_file(args.save, "--save")
        (spec,) = runner.plan_runs(
            dataclasses.replace(suite, datasets={args.dataset: plan},
                                settings={args.policy: [settings]}),
            args.protocol, ".", seeds=[args.seed], data_dir=args.data_dir,
            commit=store.commit_hash(), threads=args.threads,
        )  # fmt: skip
        pool = sources.load(args.dataset, "train", plan.train_samples, args.data_dir)
        protocols.split_pool(  # too few samples for the protocol's splits: one line, not later
            len(pool.y), spec.protocol, spec.seed, spec.val_fraction, spec.pretrain_fraction
        )
        network = models.build(
            sources.model_dataset(args.dataset), num_classes=pool.num_classes,
            input_shape=pool.input_shape, variant=plan.variant,
        )  # fmt: skip
    except (ValueError, TypeError, OSError, RuntimeError) as error:
        print(f"tinyprop train: {error}", file=sys.stderr)
        return 2
    print(f"{args.dataset} ({pool.source}), input {pool.input_shape}: "
          f"{models.summary(network, pool.input_shape)}")  # fmt: skip
    print(f"training {spec.title} ({args.protocol}, {plan.epochs} epochs, batch "
          f"{plan.batch_size}, lr {plan.lr}) ...")  # fmt: skip
    record = runner.execute_run(spec, write=False, save_model=args.save)
    if args.save:
        print(f"saved the trained weights to {args.save}")
    if args.record:
        store.write_record(args.record, record)
    if record["pretrained_metric"] is not None:
        print(f"pretrained test {record['metric_name']}: {record['pretrained_metric']:.2f}%")
    print(
        f"test {record['metric_name']}: {record['metric']:.2f}%  "
        f"(validation {record['val_metric_name']}: {record['val_metric']:.4g})\n"
        f"compute vs full: total {100 * record['compute_ratio']:.1f}%, backward "
        f"{100 * record['backward_ratio']:.1f}%; skipped {100 * record['skip_rate']:.1f}% of "
        f"{record['trained_samples'] + record['skipped_samples']} samples; "
        f"{record['train_wall_s']:.1f} s training"
    )
    print("ledger (MACs): " + json.dumps(record["ledger"]))
    return 0
