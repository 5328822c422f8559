"""The runtime README's instruction tables from ``make -C runtime bench``'s records
(benchmarks/results/runtime_instructions.json): instructions per training step by model, build,
policy and case, and the HAR benchmark run replayed step by step.

    python benchmarks/instruction_table.py        # prints both markdown tables
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "runtime_instructions.json"
NAMES = {"har-cnn1d": "HAR 1-D CNN", "keyword-ds-cnn": "DS-CNN (keyword)"}
LABELS = {"topk": "topk 0.1", "tinypropv2_chosen": "tinypropv2 (chosen)"}


def label(record: dict) -> str:
    """The policy column: topk with its ratio, the chosen setting spelled out."""
    name = record["label"]
    zero_skip = name.endswith("_zero_skip")
    base = name.removesuffix("_zero_skip")
    if zero_skip:  # the zero-skipping build's rows carry the plain policy name
        return f"{LABELS.get(base, base) if base != 'topk' else base}_zero_skip"
    return LABELS.get(base, base)


def keep_cell(keep: list[int], case: str) -> str:
    """k per layer, runs of three or more equal values as 'value xN'; '-' when skipped."""
    if case == "skipped":
        return "-"
    if not keep:
        return ""
    parts, index = [], 0
    while index < len(keep):
        run = 1
        while index + run < len(keep) and keep[index + run] == keep[index]:
            run += 1
        if run >= 3:
            parts.append(f"{keep[index]} x{run}")
        else:
            parts += [str(keep[index])] * run
        index += run
    return (", " if any(" x" in p for p in parts) else " ").join(parts)


def step_table(records: list[dict]) -> None:
    print("| model | build | policy | case | instructions | x full | x full (B=1) | trained "
          "| k per layer |")  # fmt: skip
    print("|---|---|---|---|---:|---:|---:|---:|---|")
    for r in records:
        if "replayed_run" in r:
            continue
        ratio = f"{r['ratio_to_full']:.4f}"
        if r["case"] == "median_trained":
            spread = r["trained_ratios"]
            ratio += f" (trained: min {spread['min']:.4f}, max {spread['max']:.4f})"
        batch1 = f"{r['ratio_to_full_batch1']:.4f}" if r["case"] in ("trained", "skipped") else ""
        print(f"| {NAMES[r['model']]} | {r['build']} | {label(r)} | {r['case']} | "
              f"{r['instructions']:,} | {ratio} | {batch1} | {r['trained']}/{r['samples']} | "
              f"{keep_cell(r['keep'], r['case'])} |")  # fmt: skip


def replay_table(records: list[dict]) -> None:
    print("| build | setting | case | steps | median | min | p90 | max | at <= 0.5x "
          "| k per layer (median step) |")  # fmt: skip
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---|")
    cases = {"run_trained": "trained", "run_skipped": "skipped", "run_total": "whole run"}
    for r in records:
        if "replayed_run" not in r:
            continue
        setting = "chosen" if r["label"].startswith("tinypropv2_chosen") else "default"
        case = cases[r["case"]]
        spread = r.get("step_ratios")
        if spread is None:
            print(f"| {r['build']} | {setting} | {case} | {r['samples']} | "
                  f"{r['ratio_to_full']:.3f} | | | | | |")  # fmt: skip
            continue
        keep = " ".join(map(str, r["keep"] or []))
        print(f"| {r['build']} | {setting} | {case} | {r['steps']} | {spread['median']:.3f} | "
              f"{spread['min']:.3f} | {spread['p90']:.3f} | {spread['max']:.3f} | "
              f"{spread['share_at_most_0.5']:.0%} |{' ' + keep if keep else ''} |")  # fmt: skip


def main() -> None:
    records = json.loads(RESULTS.read_text())
    step_table(records)
    print()
    replay_table(records)


if __name__ == "__main__":
    main()
