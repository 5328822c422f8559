"""Cortex-M4 build of the exported examples under every device mode (``tinyprop.memory.MODES``,
``on_device``; the accuracy-only modes are left out):
flash and RAM per model and mode, a run under QEMU (mps2-an386, semihosting) whose weights
after training are compared with the host build's (within 1e-5 relative; with 8-bit Adam
moments at most 1% of the entries beyond, by less than the learning rate: an entry can round to
the neighbouring code where the two builds' floats differ in the last bits), and instructions
per trained and skipped step
(callgrind on the host build, x86-64 gcc -O2 -fno-tree-vectorize: one float operation per
instruction, as on the Cortex-M4, whose FPU has no SIMD).

    python benchmarks/runtime_bench.py --cortex-m4      # = make -C runtime cortex-m4

Every mode is built twice, training full (dense) backprop and tinypropv2 (the library's
defaults; sparse policies need selection scratch) on built-in samples with the mode's
optimizer: Adam at lr 0.001, or SGD at the mode's learning rate for an Adam lr of 0.001; with
-DTP_MAX_LAYERS set to the model's layer count (the model struct holds that many layer
records); the in-place modes (SGD or Adam) read one sample at a time (their batch buffer
holds one).

Needs arm-none-eabi-gcc with newlib (Debian: gcc-arm-none-eabi libnewlib-arm-none-eabi) and,
to run, qemu-system-arm (Debian: qemu-system-arm).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # stack_usage.py beside this file
from stack_usage import RUNTIME_ENTRY_POINTS, program_bound, stack_bounds  # noqa: E402

import tinyprop
from tinyprop import models
from tinyprop.export import OptimizerSpec, export_c
from tinyprop.export.runtime import runtime_dir
from tinyprop.memory import TrainingMode, modes_for

M4_FLAGS = ["-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16"]
SRAM_SIZES = (64 * 1024, 128 * 1024, 256 * 1024)  # common Cortex-M4 parts' SRAM: a build
# that fits runs in the smallest it fits
QEMU = ["qemu-system-arm", "-machine", "mps2-an386", "-nographic", "-semihosting", "-kernel"]
POLICIES = ("full", "tinypropv2")  # dense backprop of the trained layers, and TinyPropv2
EXAMPLES = {
    # name -> (dataset, one sample's shape, samples built in, batch size, epochs)
    "har-cnn1d": ("har", (6, 100), 16, 4, 2),
    "keyword-ds-cnn": ("speech_commands", (1, 49, 10), 8, 4, 1),
    "mnist-mlp": ("mnist", (1, 28, 28), 16, 8, 1),
}


def parameters_from(output: str) -> np.ndarray:
    """The float32 weights printed as bit patterns (``p INDEX HEX``) by the example."""
    bits = [int(line.split()[2], 16) for line in output.splitlines() if line.startswith("p ")]
    return np.array(bits, dtype=np.uint32).view(np.float32)


def optimizer_of(mode: TrainingMode, batch_size: int) -> OptimizerSpec:
    """The optimizer a mode trains with in the example (Adam lr 0.001, or the mode's SGD)."""
    lr = mode.learning_rate(0.001, batch_size)
    if mode.optimizer == "adam":
        return OptimizerSpec("adam", lr)
    return OptimizerSpec("sgd", lr, mode.momentum)


def instructions_per_step(host: Path, output: str) -> dict | None:
    """Instructions per skipped and per trained step of the host build (callgrind): the whole
    per-sample step over every sample, its backward (tp_backward_sample) and, in the in-place
    modes, the bound that shows every error and gradient finite before it
    (tp_in_place_bounded), both over the trained ones; a skipped step is the step without
    these two. ``bound_step``: the bound per trained sample, inside ``trained_step``."""
    if shutil.which("valgrind") is None:
        return None
    totals = {}
    for function in ("tp_sample_step", "tp_backward_sample", "tp_in_place_bounded"):
        out_file = host.with_suffix(f".{function}.callgrind")
        subprocess.run(
            ["valgrind", "--tool=callgrind", "--collect-atstart=no",
             f"--toggle-collect={function}", f"--callgrind-out-file={out_file}", str(host)],
            capture_output=True, check=True,
        )  # fmt: skip
        line = [
            x for x in out_file.read_text().splitlines() if x.startswith(("totals:", "summary:"))
        ]
        totals[function] = int(line[0].split()[1])
    batches = [x.split() for x in output.splitlines() if x.startswith("batch ")]
    trained = sum(int(b[5]) for b in batches)
    samples = trained + sum(int(b[7]) for b in batches)
    trained_only = totals["tp_backward_sample"] + totals["tp_in_place_bounded"]
    skipped_step = (totals["tp_sample_step"] - trained_only) / samples
    return {
        "build": "x86-64 gcc -O2 -fno-tree-vectorize, callgrind",
        "samples": samples,
        "trained": trained,
        "skipped_step": round(skipped_step),
        "trained_step": round(skipped_step + trained_only / trained) if trained else None,
        "bound_step": round(totals["tp_in_place_bounded"] / trained) if trained else None,
    }


def export_example(name: str, mode: TrainingMode, out: Path, policy: str):
    """Export example ``name`` (its model, built-in samples and epochs) under ``mode`` and
    ``policy`` into ``out``; returns the export's result, the config and the optimizer."""
    dataset, shape, count, batch_size, epochs = EXAMPLES[name]
    torch.manual_seed(0)
    net = models.build(dataset, input_shape=shape)
    generator = np.random.default_rng(0)
    x = generator.standard_normal((count, *shape)).astype(np.float32)
    classes = models.reference(dataset).num_classes
    y = np.arange(count) % classes
    config = tinyprop.TinyPropConfig(policy)
    if mode.memory.in_place:
        batch_size = 1  # every sample is its own step: a buffer of one sample is enough
    optimizer = optimizer_of(mode, batch_size)
    result = export_c(
        net, config, out, shape, optimizer, batch_size, (x, y), epochs, name, memory=mode.memory
    )
    return result, config, optimizer


def build_and_run(
    name: str,
    mode: TrainingMode,
    work: Path,
    policy: str = "tinypropv2",
    run: bool = True,
    count_instructions: bool = True,
) -> dict:
    """Export, build for the Cortex-M4 and size one example; with ``run``, also build it for
    the host, count its instructions and run it under QEMU against the host's weights
    (``run=False``: the sizes and the stack bound only, as ``tests/test_cortex_m4_records.py``
    checks them; ``count_instructions=False``: no callgrind)."""
    out = work / f"{name}-{mode.name}-{policy}"
    result, config, optimizer = export_example(name, mode, out, policy)
    root = runtime_dir() / "examples" / "cortex_m4"
    sources = [str(out / "main.c"), *map(str, sorted((out / "runtime/src").glob("*.c")))]
    common = ["-std=c99", "-O2", "-DTP_EMBEDDED_SAMPLES", "-DTP_PRINT_PARAMETERS",
              f"-DTP_MAX_LAYERS={len(result.layers)}",
              "-I", str(out / "runtime/include"), "-I", str(out)]  # fmt: skip
    elf = out / "train_m4.elf"

    def link(target: Path, *extra: str) -> None:
        subprocess.run(
            ["arm-none-eabi-gcc", *common, *M4_FLAGS, "--specs=rdimon.specs", *sources,
             str(root / "startup.c"), "-T", str(root / "an386.ld"), *extra, "-lm", "-o",
             str(target)],
            check=True,
        )  # fmt: skip

    link(elf)
    size = subprocess.run(["arm-none-eabi-size", str(elf)], capture_output=True, text=True)
    text, data, bss = (int(v) for v in size.stdout.splitlines()[1].split()[:3])
    record = {
        "model": name,
        "mode": mode.name,
        "mode_description": mode.description,
        "first_trained_layer": mode.memory.first_trained_layer,
        "sgd_in_place": mode.memory.sgd_in_place,
        "bias_only_layers": list(mode.memory.bias_only_layers),
        "momentum_in_place": mode.memory.momentum_in_place,
        "selection_in_place": mode.memory.selection_in_place,
        "adam_in_place": mode.memory.adam_in_place,
        "moment_bits": mode.memory.moment_bits,
        "recompute_layers": list(mode.memory.recompute_layers),
        "optimizer": optimizer.kind,
        "momentum": optimizer.momentum,
        "policy": config.policy,
        "parameters": result.parameters,
        "trained_parameters": result.memory.trained_parameters,
        "text": text,
        "data": data,
        "bss": bss,
        "flash_bytes": text + data,
        "ram_bytes": data + bss,
        "training_arena_bytes": result.arena_bytes,  # inside bss (a static array)
        "arena_parts": {
            "parameters": result.memory.parameter_bytes,
            "gradients": result.memory.gradient_bytes,
            "optimizer": result.memory.optimizer_bytes,
            "step_buffers": result.memory.transient_bytes,
        },
        "inference_bytes": result.inference_bytes,
        "compiler": "arm-none-eabi-gcc -O2 " + " ".join(M4_FLAGS),
        "stack_bound": stack_bound_of(elf),
        "qemu": None,
    }
    if not run:
        return record
    host = out / "train_host"
    subprocess.run(
        ["gcc", *common, "-fno-tree-vectorize", *sources, "-lm", "-o", str(host)], check=True
    )
    host_run = subprocess.run([str(host)], capture_output=True, text=True, check=True)
    record["instructions"] = (
        instructions_per_step(host, host_run.stdout) if count_instructions else None
    )
    if shutil.which("qemu-system-arm") is None:
        record["qemu"] = "not run: qemu-system-arm not found (apt-get install -y qemu-system-arm)"
        return record
    measured = out / "train_m4_measured.elf"  # the same program, its stack painted
    link(measured, str(root / "stack_paint.c"), "-Wl,--wrap=main")
    qemu = subprocess.run([*QEMU, str(measured)], capture_output=True, text=True, timeout=600)
    ok = qemu.returncode == 0 and "\ndone\n" in qemu.stdout
    record["measured_memory"] = measured_memory(qemu.stdout)
    board, reference = parameters_from(qemu.stdout), parameters_from(host_run.stdout)
    same_shape = board.shape == reference.shape and board.size == result.memory.trained_parameters
    difference = (
        float(np.max(np.abs(board - reference)) / np.max(np.abs(reference))) if same_shape else None
    )
    scale = float(np.abs(reference).max()) if same_shape else 0.0
    close = np.isclose(board, reference, rtol=1e-5, atol=1e-5 * scale) if same_shape else None
    beyond = int((~close).sum()) if same_shape else None
    within_1e5 = bool(same_shape and beyond == 0)
    if mode.memory.moment_bits == 8:
        # an entry can round to the neighbouring 8-bit code on one side when the floats it
        # rounds differ in the last bits (libm, order of additions): the parity tests' bound
        match = bool(
            same_shape
            and beyond <= max(1, 0.01 * board.size)
            and float(np.abs(board - reference).max()) <= optimizer.lr
        )
    else:
        match = within_1e5
    batches_board = [line for line in qemu.stdout.splitlines() if line.startswith("batch ")]
    batches_host = [line for line in host_run.stdout.splitlines() if line.startswith("batch ")]
    record["qemu"] = {
        "ran": ok,
        "exit_code": qemu.returncode,
        **({} if ok else {"output_tail": (qemu.stdout[-300:] + qemu.stderr[-300:])}),
        "batches": len(batches_board),
        "max_relative_weight_difference_to_host": difference,
        "bit_identical_weights": bool(same_shape and np.array_equal(board, reference)),
        "weights_match_1e-5": within_1e5,
        "entries_beyond_1e-5": beyond,
        "weights_match": match,
        "same_skip_decisions": [line.split()[-3:] for line in batches_board]
        == [line.split()[-3:] for line in batches_host],
    }
    if ok and record["measured_memory"]:
        record["sram_run"] = run_in_sram(record, link, out, qemu.stdout)
    return record


def stack_bound_of(elf: Path) -> dict:
    """The worst-case stack of the runtime's calls (read from the machine code; the deepest
    entry point and its chain) and of the whole program with newlib's stdio left out."""
    bounds = stack_bounds(elf, RUNTIME_ENTRY_POINTS)
    deepest = max(bounds, key=lambda name: bounds[name]["bytes"])
    program = program_bound(elf)
    return {
        "runtime_bytes": bounds[deepest]["bytes"],
        "runtime_chain": bounds[deepest]["chain"],
        "per_entry_point": {name: bound["bytes"] for name, bound in bounds.items()},
        "program_bytes": program["bytes"],
        "program_chain": program["chain"],
        "program_left_out": program["left_out"],
    }


def measured_memory(output: str) -> dict | None:
    """``memory stack S heap H`` of the painted build (stack_paint.c), or None."""
    lines = [line.split() for line in output.splitlines() if line.startswith("memory stack ")]
    if not lines:
        return None
    return {"stack_bytes": int(lines[0][2]), "heap_bytes": int(lines[0][4])}


def sram_needed(record: dict) -> int:
    """Bytes of SRAM the program needs: .data + .bss (the arena inside), the heap newlib's
    stdio takes, and the stack: the larger of the measured one and the bound from the code."""
    memory = record["measured_memory"]
    stack = max(memory["stack_bytes"], record["stack_bound"]["program_bytes"])
    return record["ram_bytes"] + memory["heap_bytes"] + stack


def run_in_sram(record: dict, link, out: Path, painted_output: str) -> dict | None:
    """Run the program again with its stack at the top of the smallest SRAM size it fits
    (64 KB, 128 KB or 256 KB), as on such a part; its weights must still be the host's."""
    needed = sram_needed(record)
    fitting = [size for size in SRAM_SIZES if needed <= size]
    if not fitting:
        return None
    elf = out / f"train_m4_sram{fitting[0]}.elf"
    link(elf, str(runtime_dir() / "examples/cortex_m4/stack_paint.c"), "-Wl,--wrap=main",
         f"-DTP_SRAM_BYTES={fitting[0]}")  # fmt: skip
    qemu = subprocess.run([*QEMU, str(elf)], capture_output=True, text=True, timeout=600)
    line = next((x for x in qemu.stdout.splitlines() if x.startswith("memory ")), "")
    board = parameters_from(qemu.stdout)
    return {
        "sram_bytes": fitting[0],
        "needed_bytes": needed,
        "stack_bytes": int(line.split()[2]) if line.startswith("memory stack") else None,
        "fits": line.endswith(f"sram {fitting[0]} fits") and "\ndone\n" in qemu.stdout,
        # the same program as the painted run, its stack elsewhere: the same floats
        "same_weights_as_painted_run": bool(
            board.size > 0 and np.array_equal(board, parameters_from(painted_output))
        ),
    }


def cortex_m4(out: Path, models: list[str] | None = None) -> int:
    """Build, size and run every example (or those named in ``models``, whose records then
    replace theirs in ``out``); write ``out`` (JSON) and print a table."""
    unknown = sorted(set(models or []) - set(EXAMPLES))
    if unknown:
        print(f"unknown example models {unknown}; choose from {list(EXAMPLES)}")
        return 2
    if shutil.which("arm-none-eabi-gcc") is None:
        print("arm-none-eabi-gcc not found: apt-get install -y gcc-arm-none-eabi "
              "libnewlib-arm-none-eabi qemu-system-arm")  # fmt: skip
        return 1
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (dataset, *_) in EXAMPLES.items():
            if models and name not in models:
                continue
            for mode in modes_for(dataset):
                if not mode.on_device:
                    continue
                for policy in POLICIES:
                    records.append(build_and_run(name, mode, Path(tmp), policy))
                    print(f"built and ran {name} {mode.name} {policy}", flush=True)
    if models and out.is_file():  # keep the other models' records, in the examples' order
        kept = [r for r in json.loads(out.read_text()) if r["model"] not in models]
        order = list(EXAMPLES)
        records = sorted(kept + records, key=lambda r: order.index(r["model"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, indent=2) + "\n")
    print(
        f"{'model':<16} {'mode':<20} {'policy':<11} {'flash':>9} {'RAM':>9} {'arena':>9} "
        f"{'stack':>6} {'bound':>6} {'heap':>6} {'skipped':>10} {'trained':>10}  QEMU"
    )
    for r in records:
        q = r["qemu"]
        if isinstance(q, str):
            status = q
        else:
            verdict = (
                "bit-identical"
                if q["bit_identical_weights"]
                else "within 1e-5"
                if q["weights_match_1e-5"]
                else f"{q['entries_beyond_1e-5']} entries beyond 1e-5, within the 8-bit bound"
                if q["weights_match"]
                else "DIFFERENT"
            )
            difference = q["max_relative_weight_difference_to_host"]
            status = (
                f"ran {q['batches']} batches, weights vs host: max rel diff "
                f"{'none (no comparable weights)' if difference is None else f'{difference:.2e}'}"
                f" ({verdict}), skip decisions "
                f"{'same' if q['same_skip_decisions'] else 'DIFFERENT'}"
            )
        steps = r.get("instructions") or {}
        skipped, trained = steps.get("skipped_step") or "-", steps.get("trained_step") or "-"
        memory = r.get("measured_memory") or {}
        sram = r.get("sram_run")
        if sram:
            status += (
                f"; ran in {sram['sram_bytes'] // 1024} KB SRAM: "
                f"{'yes' if sram['fits'] and sram['same_weights_as_painted_run'] else 'NO'}"
            )
        print(
            f"{r['model']:<16} {r['mode']:<20} {r['policy']:<11} {r['flash_bytes']:>9} "
            f"{r['ram_bytes']:>9} {r['training_arena_bytes']:>9} "
            f"{memory.get('stack_bytes', '-'):>6} {r['stack_bound']['program_bytes']:>6} "
            f"{memory.get('heap_bytes', '-'):>6} {skipped:>10} {trained:>10}  {status}"
        )
    print(f"wrote {out}")
    failed = [(r["model"], r["mode"], r["policy"]) for r in records
              if isinstance(r["qemu"], dict) and not (
                  r["qemu"]["ran"] and r["qemu"]["weights_match"]
                  and r["qemu"]["same_skip_decisions"]
                  and (r.get("sram_run") is None or (r["sram_run"]["fits"]
                       and r["sram_run"]["same_weights_as_painted_run"])))]  # fmt: skip
    return 1 if failed else 0
