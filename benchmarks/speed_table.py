"""Markdown tables of the wall-clock records, their floors and unified vs per-sample top-k
(for docs/speed.md), read from ``benchmarks/results/speed.json``, ``speed_floor.json``,
``finetune_speed.json`` and ``unified_accuracy.json``; ``--readme`` writes the summary of the
targets into README.md between its speed-table markers.

Run:
    python benchmarks/speed_table.py
    python benchmarks/speed_table.py --readme
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
README = Path(__file__).parents[1] / "README.md"
README_START, README_END = "<!-- speed-table: start -->", "<!-- speed-table: end -->"


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


def floor_table(record: dict) -> list[str]:
    """Per workload and thread count: full's step, its parts, the floor, measured, target."""
    lines = [
        "| workload (batch) | threads | full ms | forward + loss | optimizer | dense backward "
        "| r | floor | measured | target |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for threads, results in record["threads"].items():
        for name, row in results.items():
            measured = "{:.2f} ({:.2f}–{:.2f})".format(row["measured"], *row["measured_spread"])
            verdict = " blocked" if row["floor"] > row["target"] else ""
            lines.append(
                f"| {name} ({row['batch_size']}) | {threads} | {row['ms_full']:.1f} | "
                f"{row['ms_forward_and_loss']:.1f} | {row['ms_optimizer']:.1f} | "
                f"{row['ms_dense_backward']:.1f} | {row['backward_mac_ratio']:.3f} | "
                f"{row['floor']:.2f} | {measured} {row['policy']} | {row['target']}{verdict} |"
            )
    return lines


def readme_summary(speed: dict, floor: dict, finetune: dict) -> list[str]:
    """The targets of the speed issue: measured beside the MAC limit, the floor and the target,
    per thread count (the finetune runs at the bench's one thread)."""
    threads = list(speed["threads"])
    lines = [
        f"`{speed['command']}`, `{floor['command']}` and `{finetune['command']}` (commit "
        f"{speed['commit']}; load {speed.get('load_average')}"
        + (f"; the finetune runs at commit {finetune['commit']}, load "
           f"{finetune.get('load_average')}" if finetune.get("commit", speed["commit"])
           != speed["commit"] else "")
        + "); wall time vs `full`, "
        + " / ".join(f"{t} thread(s)" for t in threads) + ":",
        "",
        "| model (batch) | topk 0.05 | topk 0.05 fused SGD | topk 0.05 unified | MAC limit "
        "| floor | target |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for model, entry in speed["threads"][threads[0]].items():
        cells = []
        for policy in ("topk 0.05", "topk 0.05 fused SGD", "topk 0.05 unified"):
            rows = [speed["threads"][t][model]["policies"].get(policy) for t in threads]
            cells.append(" / ".join(f"{row['ratio_to_full']:.2f}" if row else "–" for row in rows))
        floors = [floor["threads"].get(t, {}).get(model) for t in threads]
        limit = entry["policies"]["topk 0.05"]["mac_ratio"]
        lines.append(
            f"| {model} ({entry['batch_size']}) | {cells[0]} | {cells[1]} | {cells[2]} | "
            f"{limit:.2f} | "
            + " / ".join(f"{row['floor']:.2f}" if row else "–" for row in floors)
            + f" | {floor_target(floors)} |"
        )
    for dataset, runs in finetune["runs"].items():
        name = f"finetune {dataset}"
        row = runs["tinypropv2"]
        floors = [floor["threads"].get(str(finetune["threads"]), {}).get(name)]
        lines.append(
            f"| {name}, tinypropv2, whole run ({finetune['threads']} thread) | "
            f"{row['ratio_to_full']:.2f} | – | – | {row['mac_ratio']:.2f} | "
            + (f"{floors[0]['floor']:.2f}" if floors[0] else "–")
            + f" | {floor_target(floors)} |"
        )
    return lines


def floor_target(floors: list) -> str:
    """The target, marked blocked when a floor measured for it is above it."""
    known = [row for row in floors if row]
    if not known:
        return "–"
    blocked = [row for row in known if row["floor"] > row["target"]]
    return f"{known[0]['target']}" + (" (blocked: the floor is above it)" if blocked else "")


def write_readme(lines: list[str]) -> None:
    text = README.read_text()
    start, end = text.index(README_START), text.index(README_END)
    body = "\n".join(lines)
    README.write_text(text[: start + len(README_START)] + "\n" + body + "\n" + text[end:])
    print(f"wrote the speed summary into {README}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--readme", action="store_true", help="write the README summary")
    args = parser.parse_args()
    speed = json.loads((RESULTS / "speed.json").read_text())
    finetune = json.loads((RESULTS / "finetune_speed.json").read_text())
    floor = json.loads((RESULTS / "speed_floor.json").read_text())
    if args.readme:
        write_readme(readme_summary(speed, floor, finetune))
        return
    print(f"`{speed['command']}` (commit {speed['commit']}, {speed['machine']}, "
          f"load {speed.get('load_average', 'not recorded')}):\n")  # fmt: skip
    print("\n".join(speed_table(speed)))
    print(f"\n`{floor['command']}` (commit {floor['commit']}, load {floor['load_average']}):\n")
    print("\n".join(floor_table(floor)))
    print(f"\n`{finetune['command']}` (commit {finetune.get('commit', 'not recorded')}, "
          f"{finetune['threads']} torch thread(s), "
          f"load {finetune.get('load_average', 'not recorded')}):\n")  # fmt: skip
    print("\n".join(finetune_table(finetune)))
    unified = json.loads((RESULTS / "unified_accuracy.json").read_text())
    print("\ntest metric (backward % of full reached), finetune, small suite:\n")
    print("\n".join(unified_table(unified)))


if __name__ == "__main__":
    main()
