"""The runtime README's memory-mode table: for every example model x mode x policy, flash,
RAM (data + bss, the arena inside) and the arena from the Cortex-M4 build
(benchmarks/results/runtime_cortex_m4.json, ``make -C runtime cortex-m4``), the finetune
accuracy over 3 seeds (benchmarks/results/memory-modes/, ``python
benchmarks/memory_modes.py``) against full float training of all layers with Adam, and the
instructions per skipped and trained step (callgrind, host build; in brackets, the in-place
modes' bound inside the trained step).

    python benchmarks/memory_table.py        # prints the markdown tables

A second table says, per example model, what training every layer with Adam needs and which
measured builds fit 64 KB, 128 KB and 256 KB of SRAM: data + bss (the arena inside), the heap
newlib's stdio takes and the stack (the larger of the deepest stack measured under QEMU by stack
painting and the bound read from the machine code, benchmarks/stack_usage.py); each build
that fits was run again under QEMU with its stack at the top of that SRAM size. A third lists
the accuracy-only modes (``TrainingMode.on_device`` False: which layers, learning rates or
optimizers matter) with the arena the runtime's plan gives them.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from cortex_m4 import sram_needed  # benchmarks/cortex_m4.py, beside this file

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
    print("| model | mode | policy | flash | RAM | arena | stack (measured / bound) | heap "
          "| accuracy (3 seeds) | vs all-adam full | instr. skipped step | instr. trained step "
          "(in-place bound) | QEMU |")  # fmt: skip
    print("|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---|")
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
        trained = f"{steps.get('trained_step') or 0:,}"
        if steps.get("bound_step"):  # the in-place modes' bound, inside the trained step
            trained += f" ({steps['bound_step']:,})"
        memory = r.get("measured_memory") or {}
        stack = (
            f"{memory['stack_bytes']:,} / {r['stack_bound']['program_bytes']:,}" if memory else "-"
        )
        print(
            f"| {NAMES[r['model']]} | {r['mode']} | {r['policy']} | {r['flash_bytes']:,} | "
            f"{r['ram_bytes']:,} | {r['training_arena_bytes']:,} | {stack} | "
            f"{memory.get('heap_bytes', 0):,} | {accuracy} | {delta} | "
            f"{steps.get('skipped_step', 0):,} | {trained} | {qemu} |"
        )


# common Cortex-M4 parts' SRAM
SRAM_SIZES = {"64 KB": 64 * 1024, "128 KB": 128 * 1024, "256 KB": 256 * 1024}


def ran_in(record: dict, limit: int) -> str:
    """ " (ran)" when the build ran under QEMU with its stack at the top of ``limit`` bytes."""
    run = record.get("sram_run") or {}
    ok = run.get("sram_bytes") == limit and run["fits"] and run["same_weights_as_painted_run"]
    return " (ran)" if ok else ""


def fit_table(records: list[dict]) -> None:
    """Per example model: the SRAM (data + bss, heap, stack) of training every layer with Adam,
    and the measured modes whose build fits 64 KB, 128 KB and 256 KB of SRAM, each as the SRAM
    under full / tinypropv2 ("over" where that policy's build does not fit; "(ran)": run under
    QEMU with its stack at the top of the smallest of these sizes it fits)."""
    print("| model | every layer, Adam: SRAM (arena) full / tinypropv2 | "
          + " | ".join(f"modes within {name}: SRAM full / tinypropv2" for name in SRAM_SIZES)
          + " |")  # fmt: skip
    print("|---|---|" + "---|" * len(SRAM_SIZES))
    for model in DATASETS:
        ram = {(r["mode"], r["policy"]): r for r in records if r["model"] == model}
        need = {key: sram_needed(r) for key, r in ram.items()}
        # by the SRAM full training needs, ties by name (a set alone has no fixed order)
        modes = sorted(sorted({mode for mode, _ in ram}), key=lambda m: need[(m, "full")])
        every = [("all-adam", p) for p in ("full", "tinypropv2")]
        default = " / ".join(f"{need[k]:,} ({ram[k]['training_arena_bytes']:,})" for k in every)
        cells = []
        for limit in SRAM_SIZES.values():
            fitting = []
            for mode in modes:
                keys = [(mode, p) for p in ("full", "tinypropv2")]
                if min(need[k] for k in keys) <= limit:
                    shown = [
                        f"{need[k]:,}{ran_in(ram[k], limit)}" if need[k] <= limit else "over"
                        for k in keys
                    ]
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
