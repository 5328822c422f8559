"""Measure the C runtime: callgrind instruction counts of one training step, and the Cortex-M4
build (flash, RAM, a run under QEMU checked against the host).

    python benchmarks/runtime_bench.py                 # = make -C runtime bench
    python benchmarks/runtime_bench.py --cortex-m4     # = make -C runtime cortex-m4

Instruction counts (valgrind --tool=callgrind, x86-64 host, gcc -O2): for the HAR 1-D CNN and
the keyword-spotting DS-CNN, the per-sample step (forward, loss, skip decision, sparse backward
with gradient accumulation) of a sample that tinypropv2 trains, under full, topk (ratio 0.1)
and tinypropv2, and of a sample that tinypropv2 skips; plus the per-batch update (zero the
gradients, one SGD step), reported separately and as a batch-of-one total. The model is first
warmed up on a learnable synthetic task (see runtime/examples/bench_step.c).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import tinyprop
from tinyprop import models
from tinyprop.export import OptimizerSpec, export_c
from tinyprop.export.runtime import runtime_dir

ROOT = Path(__file__).resolve().parents[1]
BENCH_MODELS = {
    # name in the results -> (dataset of tinyprop.models, one sample's shape, warm-up settings
    # of bench_step.c that make the model learn the synthetic task so that samples get skipped)
    "har-cnn1d": ("har", (6, 100), ["-DWARMUP_EPOCHS=2", "-DWARMUP_LR=0.05"]),
    "keyword-ds-cnn": (
        "speech_commands",
        (1, 49, 10),
        ["-DWARMUP_EPOCHS=12", "-DWARMUP_LR=0.003", "-DWARMUP_ADAM", "-DWARMUP_SHIFT=3"],
    ),
}
CASES = [
    ("full", "trained", "full_trained"),
    ("topk", "trained", "topk_trained"),
    ("tinypropv2", "trained", "tinypropv2_trained"),
    ("tinypropv2", "skipped", "tinypropv2_skipped"),
]


def export_model(name: str, out_dir: Path, **kwargs):
    dataset, shape, _ = BENCH_MODELS[name]
    torch.manual_seed(0)
    net = models.build(dataset, input_shape=shape)
    config = tinyprop.TinyPropConfig("tinypropv2")
    # Adam needs the largest arena; the driver may warm up with either optimizer
    return export_c(net, config, out_dir, shape, OptimizerSpec("adam", 0.003), **kwargs)


def callgrind_totals(prefix: Path) -> dict[str, int]:
    """Instructions per dump name from callgrind's output files ``prefix.N``."""
    totals = {}
    for path in sorted(prefix.parent.glob(prefix.name + ".*")):
        text = path.read_text(errors="replace")
        trigger = re.search(r"^desc: Trigger: Client Request: (\S+)", text, re.M)
        summary = re.search(r"^(?:summary|totals): (\d+)", text, re.M)
        if trigger and summary:
            totals[trigger.group(1)] = int(summary.group(1))
    return totals


def measure(name: str, work: Path) -> list[dict]:
    result = export_model(name, work / name)
    program = work / name / "bench_step"
    root = runtime_dir()
    sources = [str(root / "examples/bench_step.c")]
    sources += [str(path) for path in sorted((root / "src").glob("*.c"))]
    includes = ["-I", str(root / "include"), "-I", str(root / "src"), "-I", str(work / name)]
    command = ["gcc", "-std=c99", "-O2", "-g", *BENCH_MODELS[name][2], *includes, *sources, "-lm",
               "-o", str(program)]  # fmt: skip
    subprocess.run(command, check=True)
    prefix = work / name / "callgrind.out"
    run = subprocess.run(
        ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--collect-atstart=no",
         f"--callgrind-out-file={prefix}", str(program)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    regions = {}
    for line in run.stdout.splitlines():
        if line.startswith("region "):
            parts = line.split()
            regions[parts[1]] = parts
        elif line.startswith(("found", "trained sample")):
            print(f"  {name}: {line}")
    totals = callgrind_totals(prefix)
    missing = [dump for *_, dump in CASES if dump not in totals] + (
        [] if "update" in totals else ["update"]
    )
    if missing:
        raise RuntimeError(f"{name}: no callgrind dump for {missing}; driver said:\n{run.stdout}")
    update = totals["update"]
    full = totals["full_trained"]
    records = []
    for policy, case, dump in CASES:
        parts = regions[dump]
        instructions = totals[dump]
        with_update = instructions + (update if case == "trained" else 0)
        records.append(
            {
                "model": name,
                "policy": policy,
                "case": case,
                "instructions": instructions,
                "ratio_to_full": round(instructions / full, 4),
                "ratio": 0.1 if policy == "topk" else None,
                "update_instructions": update if case == "trained" else 0,
                "instructions_batch1": with_update,
                "ratio_to_full_batch1": round(with_update / (full + update), 4),
                "macs": dict(
                    zip(
                        ("forward", "backward", "backward_dense", "selection"),
                        map(int, parts[5:9]),
                        strict=True,
                    )
                ),  # fmt: skip
                "keep": [int(v) for v in parts[10:]],
                "parameters": result.parameters,
                "training_arena_bytes": result.arena_bytes,
                "inference_bytes": result.inference_bytes,
            }
        )
    return records


def bench(out: Path) -> int:
    if shutil.which("valgrind") is None:
        print("valgrind not found: apt-get install -y valgrind", file=sys.stderr)
        return 1
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in BENCH_MODELS:
            records += measure(name, Path(tmp))
    print(f"\n{'model':<16} {'policy':<11} {'case':<8} {'instructions':>13} {'x full':>7} "
          f"{'+update (B=1)':>14} {'x full':>7}  k per layer")  # fmt: skip
    for r in records:
        print(f"{r['model']:<16} {r['policy']:<11} {r['case']:<8} {r['instructions']:>13,} "
              f"{r['ratio_to_full']:>7.3f} {r['instructions_batch1']:>14,} "
              f"{r['ratio_to_full_batch1']:>7.3f}  {r['keep']}")  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cortex-m4", action="store_true", help="cross-build and run on QEMU")
    parser.add_argument("--out", type=Path, help="JSON results file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.cortex_m4:
        from cortex_m4 import cortex_m4  # benchmarks/cortex_m4.py

        return cortex_m4(args.out or ROOT / "benchmarks/results/runtime_cortex_m4.json")
    return bench(args.out or ROOT / "benchmarks/results/runtime_instructions.json")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    np.set_printoptions(linewidth=120)
    sys.exit(main())
