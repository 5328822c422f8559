"""Markdown tables of the wall-clock records and of unified vs per-sample top-k (for
docs/benchmark.md), read from ``benchmarks/results/speed.json``, ``finetune_speed.json`` and
``unified_accuracy.json``.

Run:
    python benchmarks/speed_table.py
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def ratio(row: dict) -> str:
    return "{:.2f} ({:.2f}–{:.2f})".format(row["ratio_to_full"], *row["ratio_spread"])


def speed_table(record: dict) -> list[str]:
    """One row per model and policy, a column per thread count, then the MAC limit."""
    threads = list(record["threads"])
    lines = [
        "| model (batch) | policy | " + " | ".join(f"{t} thread(s)" for t in threads)
        + " | MAC limit |",
        "|---|---|" + "---:|" * (len(threads) + 1),
    ]  # fmt: skip
    first = record["threads"][threads[0]]
    for model, entry in first.items():
        for index, policy in enumerate(entry["policies"]):
            if policy == "full":
                continue
            cells = [ratio(record["threads"][t][model]["policies"][policy]) for t in threads]
            limit = entry["policies"][policy]["mac_ratio"]
            name = f"{model} ({entry['batch_size']})" if index == 1 else ""
            lines.append(f"| {name} | {policy} | " + " | ".join(cells) + f" | {limit:.2f} |")
    ms = {
        t: {m: e["policies"]["full"]["ms_per_step"] for m, e in record["threads"][t].items()}
        for t in threads
    }
    lines.append("")
    lines.append(
        "full, ms per step: "
        + "; ".join(
            f"{model}: " + ", ".join(f"{ms[t][model]:.1f} ({t} thr.)" for t in threads)
            for model in first
        )
    )
    return lines


def finetune_table(record: dict) -> list[str]:
    lines = [
        "| run | policy | training wall vs full | full s | MAC limit | skipped |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for dataset, runs in record["runs"].items():
        full_s = runs["full"]["train_wall_s"]
        for index, (policy, row) in enumerate(runs.items()):
            if policy == "full":
                continue
            name = f"{dataset} ({row['optimizer_batches']} steps)" if index == 1 else ""
            lines.append(
                f"| {name} | {policy} | {ratio(row)} | {full_s:.2f} | {row['mac_ratio']:.2f} "
                f"| {100 * row['skip_rate']:.1f}% |"
            )
    return lines


def unified_table(record: dict) -> list[str]:
    """Test metric (backward % reached) per dataset and budget, per-sample beside unified."""
    runs = record["runs"]
    columns = ["full", "topk per-sample", "topk unified", "tinypropv2 per-sample",
               "tinypropv2 unified"]  # fmt: skip
    lines = ["| dataset, budget | " + " | ".join(columns) + " |", "|---|" + "---:|" * 5]
    cases = dict.fromkeys(key.rsplit(" seed", 1)[0] for key in runs)
    for case in cases:
        cells = []
        for label in columns:
            rows = [row for key, row in runs.items() if key.startswith(case + " seed")
                    and key.endswith(" " + label)]  # fmt: skip
            metric = sum(row["metric"] for row in rows) / len(rows)
            backward = 100 * sum(row["backward_ratio"] for row in rows) / len(rows)
            cells.append(f"{metric:.2f}" + ("" if label == "full" else f" ({backward:.1f})"))
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    speed = json.loads((RESULTS / "speed.json").read_text())
    print(f"`{speed['command']}` (commit {speed['commit']}, {speed['machine']}, "
          f"load {speed.get('load_average', 'not recorded')}):\n")  # fmt: skip
    print("\n".join(speed_table(speed)))
    finetune = json.loads((RESULTS / "finetune_speed.json").read_text())
    print(f"\n`{finetune['command']}` ({finetune['threads']} torch thread(s), "
          f"load {finetune.get('load_average', 'not recorded')}):\n")  # fmt: skip
    print("\n".join(finetune_table(finetune)))
    unified = json.loads((RESULTS / "unified_accuracy.json").read_text())
    print("\ntest metric (backward % of full reached), finetune, small suite:\n")
    print("\n".join(unified_table(unified)))


if __name__ == "__main__":
    main()
