"""Wall time of a whole fine-tuning run: full vs tinypropv2, side by side.

A fine-tuning run of the bench's small suite (``tinyprop bench --suite small --protocol
finetune``): the model starts from its pretrained weights, and most samples are skipped by the
TinyPropv2 decision. Each policy runs the same run (same data, same pretrained weights, same
seed) ``--repeats`` times, interleaved; the ratio is each repeat's training wall time over
``full``'s in the same repeat (median, and lowest-highest). Beside it: the MAC limit (the
ledger's total vs full) and the skip rate. Records are not written.

Run:
    python benchmarks/finetune_speed.py                      # har and mnist, default settings
    python benchmarks/finetune_speed.py --datasets har --repeats 5
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
from pathlib import Path

from speed import commit, write_record

from tinyprop.bench import runner, suites

# label -> (policy, settings): the bench's tinypropv2 setting, and the same with the
# convolutions whose sparse backward cannot win backpropagated densely
SETTINGS = {
    "full": ("full", {}),
    "tinypropv2": ("tinypropv2", {"skip_threshold": 0.5, "zeta": 1.0}),
    "tinypropv2 dense-small": (
        "tinypropv2",
        {"skip_threshold": 0.5, "zeta": 1.0, "dense_small_layers": True},
    ),
}


def measure(dataset: str, repeats: int, threads: int) -> dict:
    """Train the dataset's finetune run with every setting ``repeats`` times, interleaved."""
    suite = suites.get("small")
    runs = {}
    for label, (policy, settings) in SETTINGS.items():
        spec = runner.plan_runs(
            suite, "finetune", "/nonexistent", datasets=[dataset], policies=[policy],
            seeds=[0], threads=threads,
        )[0]  # fmt: skip
        runs[label] = dataclasses.replace(spec, settings=settings)
    pretrained = runner.pretrained_state(runs["full"])
    times: dict[str, list[float]] = {policy: [] for policy in runs}
    records = {}
    for _ in range(repeats):
        for policy, spec in runs.items():
            record = runner.execute_run(spec, pretrained, write=False)
            times[policy].append(record["train_wall_s"])
            records[policy] = record
    results = {}
    for policy, record in records.items():
        ratios = [t / f for t, f in zip(times[policy], times["full"], strict=True)]
        results[policy] = {
            "settings": SETTINGS[policy][1],
            "train_wall_s": statistics.median(times[policy]),
            "ratio_to_full": statistics.median(ratios),
            "ratio_spread": [min(ratios), max(ratios)],
            "mac_ratio": record["compute_ratio"],
            "skip_rate": record["skip_rate"],
            "metric": record["metric"],
            "optimizer_batches": record["optimizer_batches"],
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["har", "mnist"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (as the bench)")
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "finetune_speed.json")
    )
    args = parser.parse_args()
    start_load = os.getloadavg()[0]
    record = {
        "command": "python " + " ".join(sys.argv), "commit": commit(), "threads": args.threads,
        "runs": {},
    }  # fmt: skip
    for dataset in args.datasets:
        results = measure(dataset, args.repeats, args.threads)
        record["runs"][dataset] = results
        print(f"\n{dataset} finetune (small suite, seed 0), {args.threads} torch threads")
        print("| policy                 | train s | wall vs full (spread) | MAC limit | skipped |")
        print("|------------------------|---------|-----------------------|-----------|---------|")
        for policy, row in results.items():
            spread = "{:.2f} ({:.2f}-{:.2f})".format(row["ratio_to_full"], *row["ratio_spread"])
            print(
                f"| {policy:<22} | {row['train_wall_s']:>7.2f} | {spread:>21} | "
                f"{row['mac_ratio']:>9.3f} | {100 * row['skip_rate']:>6.1f}% |"
            )
    write_record(record, args.out, start_load)


if __name__ == "__main__":
    main()
