"""Measure the C runtime: callgrind instruction counts of one training step, and the Cortex-M4
build (flash, RAM, a run under QEMU checked against the host).

    python benchmarks/runtime_bench.py                 # = make -C runtime bench
    python benchmarks/runtime_bench.py --cortex-m4     # = make -C runtime cortex-m4

Instruction counts (valgrind --tool=callgrind, x86-64 host, gcc -O3): for the HAR 1-D CNN and
the keyword-spotting DS-CNN, the per-sample step (forward, loss, skip decision, sparse backward
with gradient accumulation) of a sample that tinypropv2 trains, under full, topk (ratio 0.1)
and tinypropv2, and of a sample that tinypropv2 skips; plus the per-batch update (zero the
gradients, one SGD step), reported separately and as a batch-of-one total; plus the mean per
sample of a short training run (64 fresh samples in batches of 8, whole tp_train_batch calls,
updates included) under each policy from the same state; plus that tinypropv2 run replayed
sample by sample, each step also run under full on the same state, reported as the trained
sample of median ratio ("median_trained"). The model is first warmed up on a
learnable synthetic task (see runtime/examples/bench_step.c).

Besides the default settings (s_min 0.1, s_max 0.9, zeta 0.5, skip_threshold 0.5, the library's
defaults), tinypropv2 is measured at the setting the project's HAR benchmark chose on its
validation split (benchmarks/results/small-finetune/report.md: s_max 0.5, skip_threshold 0.5,
zeta 1.0), from the same warmed-up state: records with ``"label": "tinypropv2_chosen"`` and
their ``settings``.

Three builds of the same code: ``O3`` (the runtime's default flags; gcc vectorises the dense
loops with SSE2), ``O3-scalar`` (-fno-tree-vectorize: one float operation per instruction, as
on a Cortex-M4 whose FPU has no SIMD) and ``O3-zero-skip`` (-DTP_SKIP_ZERO_ERRORS=1: every
policy skips the output entries whose error is exactly zero; reported as ``<policy>_zero_skip``
beside the dense reference ``full``).
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
    # of bench_step.c that make the model learn the synthetic task so that samples get skipped;
    # HAR gets noisier samples, else it classifies every fresh sample so confidently that
    # tinypropv2 skips all of them)
    "har-cnn1d": (
        "har",
        (6, 100),
        ["-DWARMUP_EPOCHS=2", "-DWARMUP_LR=0.05", "-DWARMUP_NOISE=1.0f"],
    ),
    "keyword-ds-cnn": (
        "speech_commands",
        (1, 49, 10),
        ["-DWARMUP_EPOCHS=12", "-DWARMUP_LR=0.003", "-DWARMUP_ADAM", "-DWARMUP_SHIFT=3"],
    ),
}
# build name -> (extra gcc flags, suffix of the policy names in the results)
BUILDS = {
    "O3": ([], ""),
    "O3-scalar": (["-fno-tree-vectorize"], ""),
    "O3-zero-skip": (["-DTP_SKIP_ZERO_ERRORS=1"], "_zero_skip"),
}
MEAN_SAMPLES = 64
# tinypropv2's settings: the library's defaults, and the one the HAR benchmark chose on its
# validation split (small-finetune report, har row); bench_step.c sets the same numbers
DEFAULT_SETTINGS = {"s_min": 0.1, "s_max": 0.9, "zeta": 0.5, "skip_threshold": 0.5}
CHOSEN_SETTINGS = {"s_min": 0.1, "s_max": 0.5, "zeta": 1.0, "skip_threshold": 0.5}
CASES = [
    ("full", "trained", "full_trained"),
    ("topk", "trained", "topk_trained"),
    ("tinypropv2", "trained", "tinypropv2_trained"),
    ("tinypropv2", "skipped", "tinypropv2_skipped"),
    ("tinypropv2_chosen", "trained", "tinypropv2_chosen_trained"),
    ("tinypropv2_chosen", "skipped", "tinypropv2_chosen_skipped"),
    ("full", "mean", "full_mean"),
    ("topk", "mean", "topk_mean"),
    ("tinypropv2", "mean", "tinypropv2_mean"),
    ("tinypropv2_chosen", "mean", "tinypropv2_chosen_mean"),
]


def settings_of(label: str) -> dict | None:
    """The tinypropv2 settings a record's label stands for (None for full and topk)."""
    if label == "tinypropv2_chosen":
        return dict(CHOSEN_SETTINGS, chosen_by="small-finetune har, validation split")
    if label == "tinypropv2":
        return dict(DEFAULT_SETTINGS)
    return None


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


def run_build(name: str, work: Path, build: str) -> tuple[dict[str, int], dict[str, list]]:
    """Compile bench_step.c for one model and build, run it under callgrind.

    Returns:
        (instructions per dump name, the driver's ``region`` line split into words per name).
    """
    root = runtime_dir()
    program = work / name / f"bench_step_{build}"
    sources = [str(root / "examples/bench_step.c")]
    sources += [str(path) for path in sorted((root / "src").glob("*.c"))]
    includes = ["-I", str(root / "include"), "-I", str(root / "src"), "-I", str(work / name)]
    flags = [*BUILDS[build][0], *BENCH_MODELS[name][2], f"-DMEAN_SAMPLES={MEAN_SAMPLES}"]
    command = ["gcc", "-std=c99", "-O3", "-g", *flags, *includes, *sources, "-lm",
               "-o", str(program)]  # fmt: skip
    subprocess.run(command, check=True)
    prefix = work / name / f"callgrind.{build}.out"
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
        elif line.startswith(("sample ", "samplec ")):  # the tinypropv2 runs replayed
            parts = line.split()
            regions[f"{parts[0]}_{parts[1]}"] = parts
        elif line.startswith(("found", "trained sample")):
            print(f"  {name} {build}: {line}")
    totals = callgrind_totals(prefix)
    missing = [dump for *_, dump in CASES if dump not in totals] + (
        [] if "update" in totals else ["update"]
    )
    if missing:
        raise RuntimeError(f"{name}: no callgrind dump for {missing}; driver said:\n{run.stdout}")
    return totals, regions


def measure(name: str, work: Path) -> list[dict]:
    result = export_model(name, work / name)
    runs = {build: run_build(name, work, build) for build in BUILDS}
    # every record's reference: the dense `full` step of the same vectorisation (a trained
    # sample for the single-sample cases, the same training run for the mean)
    reference = {b: runs["O3" if suffix else b][0] for b, (_, suffix) in BUILDS.items()}
    records = []
    for build, (_, suffix) in BUILDS.items():
        totals, regions = runs[build]
        update = totals["update"]
        for label, case, dump in CASES:
            policy = label.removesuffix("_chosen")
            parts = regions[dump]
            samples = MEAN_SAMPLES if case == "mean" else 1
            instructions = round(totals[dump] / samples)
            full_dump = "full_mean" if case == "mean" else "full_trained"  # skipped: vs trained
            full = round(reference[build][full_dump] / samples)
            own_full = round(totals[full_dump] / samples)
            with_update = instructions + (update if case == "trained" else 0)
            full_update = full + (update if case != "mean" else 0)
            macs = dict(
                zip(("forward", "backward", "backward_dense", "selection"), map(int, parts[5:9]),
                    strict=True)
            )  # fmt: skip
            record = {
                "model": name,
                "policy": policy + suffix,
                "label": label + suffix,
                "settings": settings_of(label),
                "case": case,
                "instructions": instructions,
                "ratio_to_full": round(instructions / full, 4),
                "build": build,
                "ratio": 0.1 if policy == "topk" else None,
                "update_instructions": update if case == "trained" else 0,
                "instructions_batch1": with_update if case != "mean" else instructions,
                "ratio_to_full_batch1": round(
                    (with_update if case != "mean" else instructions) / full_update, 4
                ),
                "macs": {key: value // samples for key, value in macs.items()},
                "trained": int(parts[3]),
                "samples": samples,
                "keep": [int(v) for v in parts[10:]] if case != "mean" else [],
                "parameters": result.parameters,
                "training_arena_bytes": result.arena_bytes,
                "inference_bytes": result.inference_bytes,
            }
            if suffix:
                record["ratio_to_full" + suffix] = round(instructions / own_full, 4)
            records.append(record)
        for tag in ("", "c"):
            records.append(
                median_trained(name, build, suffix, totals, regions, reference[build], tag)
            )
    return records


def median_trained(
    name: str,
    build: str,
    suffix: str,
    totals: dict[str, int],
    regions: dict,
    full: dict,
    tag: str = "",
) -> dict:
    """The median trained sample of the tinypropv2 run replayed sample by sample.

    Each sample's step under tinypropv2 is divided by the same sample's step under full on the
    same state (``full`` holds the dumps of the matching dense build); of the trained samples,
    the one with the median ratio (the lower middle one for an even count) is reported.
    """
    samples = sorted(int(key.split("_")[1]) for key in regions if key.startswith(f"sample{tag}_"))
    trained = []
    for i in samples:
        parts = regions[f"sample{tag}_{i}"]
        if parts[3] == "1":
            ratio = totals[f"v2{tag}_sample_{i}"] / full[f"full{tag}_sample_{i}"]
            trained.append((ratio, i, [int(v) for v in parts[5:]]))
    trained.sort()
    ratio, index, keep = trained[(len(trained) - 1) // 2]
    ratios = [r for r, _, _ in trained]
    label = "tinypropv2_chosen" if tag else "tinypropv2"
    return {
        "model": name,
        "policy": "tinypropv2" + suffix,
        "label": label + suffix,
        "settings": settings_of(label),
        "case": "median_trained",
        "instructions": totals[f"v2{tag}_sample_{index}"],
        "ratio_to_full": round(ratio, 4),
        "build": build,
        "ratio": None,
        "instructions_batch1": totals[f"v2{tag}_sample_{index}"],
        "ratio_to_full_batch1": round(ratio, 4),
        "trained": len(trained),
        "samples": len(samples),
        "keep": keep,
        "sample": index,
        "trained_ratios": {
            "min": round(min(ratios), 4),
            "median": round(ratio, 4),
            "max": round(max(ratios), 4),
        },
    }


def print_table(records: list[dict]) -> None:
    print(f"\n{'model':<15} {'build':<13} {'label':<28} {'case':<14} {'instructions':>12} "
          f"{'x full':>7} {'+update':>11} {'x full':>6}  trained  k per layer")  # fmt: skip
    for r in records:
        trained = f"{r['trained']}/{r['samples']}"
        print(f"{r['model']:<15} {r['build']:<13} {r['label']:<28} {r['case']:<14} "
              f"{r['instructions']:>12,} {r['ratio_to_full']:>7.3f} "
              f"{r['instructions_batch1']:>11,} {r['ratio_to_full_batch1']:>6.3f}  "
              f"{trained:>7}  {r['keep'] or ''}")  # fmt: skip


def bench(out: Path) -> int:
    if shutil.which("valgrind") is None:
        print("valgrind not found: apt-get install -y valgrind", file=sys.stderr)
        return 1
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in BENCH_MODELS:
            records += measure(name, Path(tmp))
    print_table(records)
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
