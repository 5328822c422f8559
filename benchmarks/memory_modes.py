"""Accuracy of every memory-lean training mode (``tinyprop.memory.MODES``) under the small
suite's finetune protocol, for the HAR and keyword (speech_commands) models: dense backprop
(``full``) and the tinypropv2 setting the suite chose, 3 seeds. One JSON record per run in
benchmarks/results/memory-modes/ (finished runs are skipped, so the command resumes), then a
table of mean and standard deviation per dataset, mode and policy.

    python benchmarks/memory_modes.py                    # all of it (a few CPU-minutes)
    python benchmarks/memory_modes.py --datasets har --seeds 0
    python benchmarks/memory_modes.py --datasets speech_commands --modes last2-adam
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from tinyprop.bench import store
from tinyprop.bench.modes import CHOSEN_TINYPROPV2, record_path, run_mode
from tinyprop.bench.suites import settings_label
from tinyprop.memory import modes_for

RESULTS = Path(__file__).resolve().parent / "results" / "memory-modes"


def runs(datasets, seeds, policies, names=None):
    for dataset in datasets:
        for seed in seeds:
            for mode in modes_for(dataset):
                if names and mode.name not in names:
                    continue
                for policy in policies:
                    settings = CHOSEN_TINYPROPV2[dataset] if policy == "tinypropv2" else {}
                    yield dataset, mode, policy, settings, seed


def summary(results: Path) -> list[dict]:
    """Mean and standard deviation of the test accuracy per dataset, mode and policy."""
    groups: dict[tuple, list[dict]] = {}
    for path in sorted(results.glob("finetune__*.json")):
        record = json.loads(path.read_text())
        key = (
            record["dataset"],
            record["mode"],
            record["policy"],
            settings_label(record["settings"]),
        )
        groups.setdefault(key, []).append(record)
    rows = []
    for (dataset, mode, policy, label), records in sorted(groups.items()):
        values = [r["metric"] for r in records]
        rows.append({
            "dataset": dataset, "mode": mode, "policy": policy, "settings": label,
            "seeds": len(values), "accuracy_mean": statistics.mean(values),
            "accuracy_std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "backward_ratio": statistics.mean(r["ledger"]["backward_ratio"] for r in records),
            "pretrained_mean": statistics.mean(r["pretrained_metric"] for r in records),
            "val_mean": statistics.mean(r["val_metric"] for r in records),
        })  # fmt: skip
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["har", "speech_commands"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--policies", nargs="+", default=["full", "tinypropv2"])
    parser.add_argument("--modes", nargs="+", help="only these modes (names); default: all")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    for dataset, mode, policy, settings, seed in runs(
        args.datasets, args.seeds, args.policies, args.modes
    ):
        label = f"{policy}__{settings_label(settings)}"
        path = record_path(args.results, dataset, mode, label, seed)
        if path.is_file():
            continue
        record = run_mode(dataset, mode, policy, settings, seed)
        store.write_record(path, record)
        print(f"{dataset} {mode.name} {label} seed {seed}: accuracy {record['metric']:.2f} "
              f"({record['wall_s']:.0f} s)", flush=True)  # fmt: skip
    rows = summary(args.results)
    print(f"{'dataset':<16} {'mode':<26} {'policy':<11} seeds  accuracy        validation"
          "  backward")  # fmt: skip
    for r in rows:
        accuracy = f"{r['accuracy_mean']:6.2f} ± {r['accuracy_std']:4.2f}"
        print(f"{r['dataset']:<16} {r['mode']:<26} {r['policy']:<11} {r['seeds']:>5}  "
              f"{accuracy}   {r['val_mean']:6.2f}     {r['backward_ratio']:.3f}")  # fmt: skip
    (args.results / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
