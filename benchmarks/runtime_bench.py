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

Then the project's HAR benchmark run (small suite, finetune, seed 0: BasicMotions, the pretrained
weights, the on-device samples in the benchmark's order and batches) is replayed in the runtime
(runtime/examples/bench_replay.c), every step measured under tinypropv2 and under full on the same
state: the median trained and skipped step with the spread of the ratios ("run_trained",
"run_skipped") and the whole run's instructions against full's ("run_total"), in the O3 and
O3-scalar builds, at both settings.

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


def run_driver(
    driver: str, model_dir: Path, program: Path, flags: list[str]
) -> tuple[str, dict[str, int]]:
    """Compile runtime/examples/<driver>.c against the export in ``model_dir`` (gcc -O3 and
    ``flags``) into ``program`` and run it under callgrind.

    Returns:
        (the driver's standard output, instructions per dump name).
    """
    root = runtime_dir()
    sources = [str(root / "examples" / f"{driver}.c")]
    sources += [str(path) for path in sorted((root / "src").glob("*.c"))]
    includes = ["-I", str(root / "include"), "-I", str(root / "src"), "-I", str(model_dir)]
    command = ["gcc", "-std=c99", "-O3", "-g", *flags, *includes, *sources, "-lm",
               "-o", str(program)]  # fmt: skip
    subprocess.run(command, check=True)
    prefix = program.with_name(f"callgrind.{program.name}.out")
    run = subprocess.run(
        ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--collect-atstart=no",
         f"--callgrind-out-file={prefix}", str(program)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return run.stdout, callgrind_totals(prefix)


def run_build(name: str, work: Path, build: str) -> tuple[dict[str, int], dict[str, list]]:
    """Compile bench_step.c for one model and build, run it under callgrind.

    Returns:
        (instructions per dump name, the driver's ``region`` line split into words per name).
    """
    flags = [*BUILDS[build][0], *BENCH_MODELS[name][2], f"-DMEAN_SAMPLES={MEAN_SAMPLES}"]
    stdout, totals = run_driver("bench_step", work / name, work / name / f"bench_step_{build}",
                                flags)  # fmt: skip
    regions = {}
    for line in stdout.splitlines():
        if line.startswith("region "):
            parts = line.split()
            regions[parts[1]] = parts
        elif line.startswith(("sample ", "samplec ")):  # the tinypropv2 runs replayed
            parts = line.split()
            regions[f"{parts[0]}_{parts[1]}"] = parts
        elif line.startswith(("found", "trained sample")):
            print(f"  {name} {build}: {line}")
    missing = [dump for *_, dump in CASES if dump not in totals] + (
        [] if "update" in totals else ["update"]
    )
    if missing:
        raise RuntimeError(f"{name}: no callgrind dump for {missing}; driver said:\n{stdout}")
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


# the replay of a real training run (bench_replay.c): tinypropv2's settings as -D flags
REPLAY_SETTINGS = {
    "tinypropv2": [],
    "tinypropv2_chosen": ["-DREPLAY_S_MAX=0.5", "-DREPLAY_ZETA=1.0", "-DREPLAY_SKIP_THRESHOLD=0.5"],
}
REPLAY_BUILDS = ("O3", "O3-scalar")


def export_har_run(out_dir: Path) -> dict:
    """The project's HAR benchmark run for bench_replay.c: the ``small`` suite's ``finetune``
    protocol, seed 0 (the pretrained weights, the on-device training samples, and the order and
    batches in which ``tinyprop bench`` feeds them), exported to ``out_dir``."""
    from tinyprop.bench import runner, suites, training

    (spec,) = runner.plan_runs(
        suites.get("small"), "finetune", str(out_dir), datasets=["har"],
        policies=["tinypropv2"], seeds=[0], max_settings=1,
    )  # fmt: skip
    pool, _, splits, _, model = runner.prepare(spec)
    model.load_state_dict(runner.pretrained_state(spec))
    x, y = pool.x[splits.train], pool.y[splits.train]
    plan = spec.plan
    # the batches of runner.execute_run's train_policy call (seed spec.seed + 2000)
    batches = [index for _, index in training.batches(len(y), plan.batch_size, plan.epochs,
                                                      spec.seed + 2000)]  # fmt: skip
    order = torch.cat(batches).tolist()
    export_c(model, tinyprop.TinyPropConfig("tinypropv2"), out_dir, tuple(pool.input_shape),
             OptimizerSpec("adam", plan.lr), batch_size=plan.batch_size,
             samples=(x.numpy(), y.numpy()))  # fmt: skip
    sizes = ", ".join(str(len(b)) for b in batches)
    (out_dir / "replay_order.h").write_text(
        "/* the order and batches of the training run (runtime_bench.py) */\n"
        f"#define REPLAY_STEPS {len(order)}\n#define REPLAY_BATCHES {len(batches)}\n"
        f"static const int32_t replay_order[{len(order)}] = {{{', '.join(map(str, order))}}};\n"
        f"static const int32_t replay_batch_size[{len(batches)}] = {{{sizes}}};\n"
    )
    return {
        "run": "small suite, finetune, seed 0",
        "source": pool.source,
        "train_samples": len(y),
        "epochs": plan.epochs,
        "batch_size": plan.batch_size,
        "optimizer": f"adam lr {plan.lr}",
        "steps": len(order),
    }


def replay(work: Path, build: str, label: str) -> list[tuple[int, int, list[int], int, int]]:
    """Run bench_replay.c for one build and setting under callgrind.

    Returns:
        Per step: (step, trained, k per layer, tinypropv2 instructions, full instructions).
    """
    flags = [*BUILDS[build][0], *REPLAY_SETTINGS[label]]
    stdout, totals = run_driver("bench_replay", work, work / f"bench_replay_{build}_{label}", flags)
    steps = []
    for line in stdout.splitlines():
        if line.startswith("step "):
            parts = line.split()  # step <i> trained <t> keep <k...>
            i = int(parts[1])
            steps.append((i, int(parts[3]), [int(v) for v in parts[5:]],
                          totals[f"v2_{i}"], totals[f"full_{i}"]))  # fmt: skip
    if not steps:
        raise RuntimeError(f"bench_replay printed no steps:\n{stdout}")
    return steps


def replay_records(work: Path) -> list[dict]:
    """Every step of the HAR benchmark's finetune run, replayed in the C runtime: per trained
    step its ratio to a full step on the same state (the median step reported, with the
    spread), per skipped step likewise, and the whole run's instructions against full's."""
    run = export_har_run(work / "har-run")
    records = []
    for build in REPLAY_BUILDS:
        for label in REPLAY_SETTINGS:
            steps = replay(work / "har-run", build, label)
            for case, chosen in (("run_trained", 1), ("run_skipped", 0)):
                cases = sorted((v2 / full, i, keep, v2) for i, t, keep, v2, full in steps
                               if t == chosen)  # fmt: skip
                if not cases:
                    continue
                ratios = np.array([r for r, *_ in cases])
                ratio, index, keep, instructions = cases[(len(cases) - 1) // 2]
                records.append({
                    "model": "har-cnn1d", "policy": "tinypropv2", "label": label,
                    "settings": settings_of(label), "case": case,
                    "instructions": instructions, "ratio_to_full": round(ratio, 4),
                    "build": build, "ratio": None, "trained": chosen * len(cases),
                    "samples": len(steps), "steps": len(cases), "keep": keep, "sample": index,
                    "step_ratios": {
                        "min": round(float(ratios.min()), 4),
                        "median": round(ratio, 4),
                        "p90": round(float(np.quantile(ratios, 0.9)), 4),
                        "max": round(float(ratios.max()), 4),
                        "share_at_most_0.5": round(float(np.mean(ratios <= 0.5)), 4),
                    },
                    "replayed_run": run,
                })  # fmt: skip
            v2_total = sum(v2 for *_, v2, _ in steps)
            full_total = sum(full for *_, full in steps)
            records.append({
                "model": "har-cnn1d", "policy": "tinypropv2", "label": label,
                "settings": settings_of(label), "case": "run_total",
                "instructions": round(v2_total / len(steps)),
                "ratio_to_full": round(v2_total / full_total, 4), "build": build,
                "ratio": None, "trained": sum(t for _, t, *_ in steps), "samples": len(steps),
                "keep": [], "replayed_run": run,
            })  # fmt: skip
    return records


def print_table(records: list[dict]) -> None:
    print(f"\n{'model':<15} {'build':<13} {'label':<28} {'case':<14} {'instructions':>12} "
          f"{'x full':>7} {'+update':>11} {'x full':>6}  trained  k per layer")  # fmt: skip
    for r in records:
        if "replayed_run" in r:
            continue
        trained = f"{r['trained']}/{r['samples']}"
        print(f"{r['model']:<15} {r['build']:<13} {r['label']:<28} {r['case']:<14} "
              f"{r['instructions']:>12,} {r['ratio_to_full']:>7.3f} "
              f"{r['instructions_batch1']:>11,} {r['ratio_to_full_batch1']:>6.3f}  "
              f"{trained:>7}  {r['keep'] or ''}")  # fmt: skip
    replayed = [r for r in records if "replayed_run" in r]
    if replayed:
        run = replayed[0]["replayed_run"]
        print(
            f"\nthe HAR benchmark's training run replayed step by step ({run['run']}, "
            f"{run['source']}: {run['train_samples']} samples x {run['epochs']} epochs, "
            f"batches of {run['batch_size']}); each step against full on the same state"
        )
        print(f"{'build':<10} {'label':<18} {'case':<12} {'steps':>6} {'median':>7} {'min':>6} "
              f"{'p90':>6} {'max':>6} {'<=0.5':>6}  k per layer (median step)")  # fmt: skip
        for r in replayed:
            spread = r.get("step_ratios")
            if spread is None:  # run_total: the whole run's ratio
                print(
                    f"{r['build']:<10} {r['label']:<18} {r['case']:<12} {r['samples']:>6} "
                    f"{r['ratio_to_full']:>7.3f}  (trained {r['trained']} of the steps)"
                )
                continue
            print(
                f"{r['build']:<10} {r['label']:<18} {r['case']:<12} {r['steps']:>6} "
                f"{spread['median']:>7.3f} {spread['min']:>6.3f} {spread['p90']:>6.3f} "
                f"{spread['max']:>6.3f} {spread['share_at_most_0.5']:>6.0%}  {r['keep'] or ''}"
            )


def bench(out: Path) -> int:
    if shutil.which("valgrind") is None:
        print("valgrind not found: apt-get install -y valgrind", file=sys.stderr)
        return 1
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in BENCH_MODELS:
            records += measure(name, Path(tmp))
        records += replay_records(Path(tmp))
    print_table(records)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cortex-m4", action="store_true", help="cross-build and run on QEMU")
    parser.add_argument("--out", type=Path, help="JSON results file")
    parser.add_argument(
        "--models",
        nargs="+",
        help="--cortex-m4: only these example models (their records replace theirs in --out)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.cortex_m4:
        from cortex_m4 import cortex_m4  # benchmarks/cortex_m4.py

        return cortex_m4(
            args.out or ROOT / "benchmarks/results/runtime_cortex_m4.json", args.models
        )
    return bench(args.out or ROOT / "benchmarks/results/runtime_instructions.json")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    np.set_printoptions(linewidth=120)
    sys.exit(main())
