"""The runtime README's memory-mode table: for every example model x mode x policy, flash,
RAM (data + bss, the arena inside) and the arena from the Cortex-M4 build
(benchmarks/results/runtime_cortex_m4.json, ``make -C runtime cortex-m4``), the finetune
accuracy over 3 seeds (benchmarks/results/memory-modes/, ``python
benchmarks/memory_modes.py``) against full float training of all layers with Adam, and the
instructions per skipped and trained step (callgrind, host build).

    python benchmarks/memory_table.py        # prints the markdown tables

A second table says, per example model, what training every layer with Adam needs and which
measured builds fit 64 KB and 256 KB of SRAM (RAM = data + bss, the arena inside; the stack
comes on top). A third lists the accuracy-only modes (``TrainingMode.on_device`` False: which
layers, learning rates or optimizers matter) with the arena the runtime's plan gives them.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from tinyprop import models
from tinyprop.config import TinyPropConfig
from tinyprop.export import OptimizerSpec, footprint
from tinyprop.memory import modes_for

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


def accuracy_cells(values: list[float], reference: list[float]) -> tuple[str, str]:
    """Mean ± standard deviation (seeds) and the difference to the reference's mean."""
    if not values:
        return "not measured", ""
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    accuracy = f"{statistics.mean(values):.2f} ± {spread:.2f} ({len(values)})"
    delta = f"{statistics.mean(values) - statistics.mean(reference):+.2f} pp" if reference else ""
    return accuracy, delta


def device_table(records: list[dict], measured: dict) -> None:
    """Every Cortex-M4 build: flash, RAM, arena, accuracy, instructions, QEMU."""
    print("| model | mode | policy | flash | RAM | arena | accuracy (3 seeds) | vs all-adam full "
          "| instr. skipped step | instr. trained step | QEMU |")  # fmt: skip
    print("|---|---|---|---:|---:|---:|---|---:|---:|---:|---|")
    for r in records:
        dataset = DATASETS[r["model"]]
        accuracy, delta = accuracy_cells(
            measured.get((dataset, r["mode"], r["policy"]), []),
            measured.get((dataset, "all-adam", "full"), []),
        )
        steps = r.get("instructions") or {}
        q = r["qemu"]
        qemu = (
            q
            if isinstance(q, str)
            else f"{q['max_relative_weight_difference_to_host']:.1e}, "
            f"{'same' if q['same_skip_decisions'] else 'DIFFERENT'} skips"
            + (f", {q['entries_beyond_1e-5']} entries beyond 1e-5"
               if q.get("entries_beyond_1e-5") else "")
        )  # fmt: skip
        print(
            f"| {NAMES[r['model']]} | {r['mode']} | {r['policy']} | {r['flash_bytes']:,} | "
            f"{r['ram_bytes']:,} | {r['training_arena_bytes']:,} | {accuracy} | {delta} | "
            f"{steps.get('skipped_step', 0):,} | {steps.get('trained_step') or 0:,} | {qemu} |"
        )


SRAM_SIZES = {"64 KB": 64 * 1024, "256 KB": 256 * 1024}  # common Cortex-M4 parts' SRAM


def fit_table(records: list[dict]) -> None:
    """Per example model: the RAM (data + bss, the training arena inside; the stack on top) of
    training every layer with Adam, and the measured modes whose build fits 64 KB and 256 KB of
    SRAM, each as RAM under full / tinypropv2 ("over" where that policy's build does not fit)."""
    print("| model | every layer, Adam: RAM (arena) full / tinypropv2 | "
          + " | ".join(f"modes within {name}: RAM full / tinypropv2" for name in SRAM_SIZES)
          + " |")  # fmt: skip
    print("|---|---|" + "---|" * len(SRAM_SIZES))
    for model in DATASETS:
        ram = {(r["mode"], r["policy"]): r for r in records if r["model"] == model}
        modes = sorted({mode for mode, _ in ram}, key=lambda m: ram[(m, "full")]["ram_bytes"])
        every = [ram[("all-adam", p)] for p in ("full", "tinypropv2")]
        default = " / ".join(f"{r['ram_bytes']:,} ({r['training_arena_bytes']:,})" for r in every)
        cells = []
        for limit in SRAM_SIZES.values():
            fitting = []
            for mode in modes:
                sizes = [ram[(mode, p)]["ram_bytes"] for p in ("full", "tinypropv2")]
                if min(sizes) <= limit:
                    shown = [f"{size:,}" if size <= limit else "over" for size in sizes]
                    fitting.append(f"{mode} {shown[0]} / {shown[1]}")
            cells.append("; ".join(fitting) or "none")
        print(f"| {NAMES[model]} | {default} | " + " | ".join(cells) + " |")


def accuracy_only_table(measured: dict) -> None:
    """The accuracy-only modes (``on_device`` False): arena from the runtime's plan."""
    print("| model | mode | what trains | optimizer, lr | arena (full) | accuracy (3 seeds) "
          "| vs all-adam full | validation |")  # fmt: skip
    print("|---|---|---|---|---:|---|---:|---:|")
    for model, dataset in DATASETS.items():
        shape = models.reference(dataset).input_shape
        net = models.build(dataset, input_shape=shape)
        for mode in modes_for(dataset):
            if mode.on_device:
                continue
            optimizer = OptimizerSpec(mode.optimizer, 0.001, mode.momentum)
            arena = footprint(net, shape, TinyPropConfig("full"), optimizer, mode.memory)
            accuracy, delta = accuracy_cells(
                measured.get((dataset, mode.name, "full"), []),
                measured.get((dataset, "all-adam", "full"), []),
            )
            validation = measured_validation(dataset, mode.name)
            rate = f"{mode.optimizer}{' momentum 0.9' if mode.momentum else ''}, x{mode.lr_scale:g}"
            print(f"| {NAMES[model]} | {mode.name} | {mode.description} | {rate} | "
                  f"{arena.arena_bytes:,} | {accuracy} | {delta} | {validation} |")  # fmt: skip


def measured_validation(dataset: str, mode: str) -> str:
    """Mean validation accuracy of a mode's dense (full) runs."""
    values = [
        json.loads(path.read_text())["val_metric"]
        for path in (RESULTS / "memory-modes").glob(f"finetune__{dataset}__{mode}__full__*.json")
    ]
    return f"{statistics.mean(values):.2f}" if values else ""


def main() -> None:
    records = json.loads((RESULTS / "runtime_cortex_m4.json").read_text())
    measured = accuracies()
    device_table(records, measured)
    print()
    fit_table(records)
    print()
    accuracy_only_table(measured)


if __name__ == "__main__":
    main()
