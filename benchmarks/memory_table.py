"""The runtime README's memory-mode table: for every example model x mode x policy, flash,
RAM (data + bss, the arena inside) and the arena from the Cortex-M4 build
(benchmarks/results/runtime_cortex_m4.json, ``make -C runtime cortex-m4``), the finetune
accuracy over 3 seeds (benchmarks/results/memory-modes/, ``python
benchmarks/memory_modes.py``) against full float training of all layers with Adam, and the
instructions per skipped and trained step (callgrind, host build).

    python benchmarks/memory_table.py        # prints the markdown table
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DATASETS = {"har-cnn1d": "har", "keyword-ds-cnn": "speech_commands", "mnist-mlp": "mnist"}
NAMES = {"har-cnn1d": "HAR 1-D CNN", "keyword-ds-cnn": "DS-CNN (keyword)", "mnist-mlp": "MNIST MLP"}


def accuracies() -> dict[tuple[str, str, str], list[float]]:
    """(dataset, mode, policy) -> test accuracies of the seeds."""
    table: dict[tuple[str, str, str], list[float]] = {}
    for path in sorted((RESULTS / "memory-modes").glob("finetune__*.json")):
        record = json.loads(path.read_text())
        key = (record["dataset"], record["mode"], record["policy"])
        table.setdefault(key, []).append(record["metric"])
    return table


def main() -> None:
    records = json.loads((RESULTS / "runtime_cortex_m4.json").read_text())
    measured = accuracies()
    print("| model | mode | policy | flash | RAM | arena | accuracy (3 seeds) | vs all-adam full "
          "| instr. skipped step | instr. trained step | QEMU |")  # fmt: skip
    print("|---|---|---|---:|---:|---:|---|---:|---:|---:|---|")
    for r in records:
        dataset = DATASETS[r["model"]]
        values = measured.get((dataset, r["mode"], r["policy"]), [])
        reference = measured.get((dataset, "all-adam", "full"), [])
        if values:
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            accuracy = f"{statistics.mean(values):.2f} ± {spread:.2f} ({len(values)})"
            delta = (
                f"{statistics.mean(values) - statistics.mean(reference):+.2f} pp"
                if reference
                else ""
            )
        else:
            accuracy, delta = "not measured", ""
        steps = r.get("instructions") or {}
        q = r["qemu"]
        qemu = (
            q
            if isinstance(q, str)
            else f"{q['max_relative_weight_difference_to_host']:.1e}, "
            f"{'same' if q['same_skip_decisions'] else 'DIFFERENT'} skips"
        )
        print(
            f"| {NAMES[r['model']]} | {r['mode']} | {r['policy']} | {r['flash_bytes']:,} | "
            f"{r['ram_bytes']:,} | {r['training_arena_bytes']:,} | {accuracy} | {delta} | "
            f"{steps.get('skipped_step', 0):,} | {steps.get('trained_step') or 0:,} | {qemu} |"
        )


if __name__ == "__main__":
    main()
