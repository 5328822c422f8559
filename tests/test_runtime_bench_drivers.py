"""The instruction-count drivers of `make -C runtime bench`, built under AddressSanitizer and
run natively (the callgrind requests replaced by no-ops; valgrind is needed only by the
benchmark itself). The real-run replay (runtime/examples/bench_replay.c) must leave the
tinypropv2 run exactly as the Python library trains it (same trained samples, same k per layer)
while it measures every step under full on a copy of the state; the single-step driver
(runtime/examples/bench_step.c) must find a trained and a skipped sample and measure its cases."""

from __future__ import annotations

import subprocess

import numpy as np
import torch
from torch import nn

import tinyprop
from tinyprop import models
from tinyprop.export import OptimizerSpec, export_c
from tinyprop.export.runtime import runtime_dir

SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
CALLGRIND_NO_OPS = """#define CALLGRIND_START_INSTRUMENTATION ((void)0)
#define CALLGRIND_STOP_INSTRUMENTATION ((void)0)
#define CALLGRIND_TOGGLE_COLLECT ((void)0)
#define CALLGRIND_DUMP_STATS_AT(name) ((void)(name))
"""


def build_driver(tmp_path, driver: str, model_dir, flags: list[str]):
    """Build runtime/examples/<driver>.c against the export in ``model_dir`` under ASan, with
    the callgrind requests as no-ops; returns the program's path."""
    shim = tmp_path / "shim"
    (shim / "valgrind").mkdir(parents=True, exist_ok=True)
    (shim / "valgrind" / "callgrind.h").write_text(CALLGRIND_NO_OPS)
    root = runtime_dir()
    program = tmp_path / driver
    build = subprocess.run(
        ["gcc", "-std=c99", "-O1", "-g", *SANITIZE, "-Wall", "-Wextra", "-Werror", *flags,
         "-I", str(shim), "-I", str(root / "include"), "-I", str(root / "src"),
         "-I", str(model_dir), str(root / "examples" / f"{driver}.c"),
         *map(str, sorted((root / "src").glob("*.c"))), "-lm", "-o", str(program)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    return program


def test_replay_driver_follows_the_python_tinypropv2_run(tmp_path):
    torch.manual_seed(0)
    shape, batch_size, count = (6, 40), 4, 10
    net = models.build("har", input_shape=shape, channels=8)
    generator = np.random.default_rng(3)
    prototypes = generator.standard_normal((4, *shape)).astype(np.float32)
    y = generator.integers(0, 4, count)
    x = (prototypes[y] + 1.5 * generator.standard_normal((count, *shape))).astype(np.float32)
    # two epochs in a shuffled order; each epoch ends with a batch of 2
    batches = []
    for _ in range(2):
        order = generator.permutation(count)
        batches += [order[i : i + batch_size] for i in range(0, count, batch_size)]
    steps = np.concatenate(batches)
    out = tmp_path / "run"
    config = tinyprop.TinyPropConfig("tinypropv2")
    export_c(net, config, out, shape, OptimizerSpec("adam", 0.01), batch_size, samples=(x, y))
    sizes = ", ".join(str(len(b)) for b in batches)
    (out / "replay_order.h").write_text(
        f"#define REPLAY_STEPS {len(steps)}\n#define REPLAY_BATCHES {len(batches)}\n"
        f"static const int32_t replay_order[] = {{{', '.join(map(str, steps))}}};\n"
        f"static const int32_t replay_batch_size[] = {{{sizes}}};\n"
    )
    program = build_driver(tmp_path, "bench_replay", out, [])
    run = subprocess.run([str(program)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = [line.split() for line in run.stdout.splitlines() if line.startswith("step ")]
    assert [int(line[1]) for line in lines] == list(range(len(steps)))
    c_trained = [int(line[3]) for line in lines]
    c_keep = [[int(v) for v in line[5:]] for line in lines if line[3] == "1"]

    model = tinyprop.apply(net, config)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    python_trained, python_keep = [], []
    for batch in batches:
        stats = tinyprop.train_step(
            model, torch.from_numpy(x[batch]), torch.from_numpy(y[batch]),
            nn.CrossEntropyLoss(reduction="none"), optimizer,
        )  # fmt: skip
        python_trained += stats.trained_mask.int().tolist()
        python_keep += torch.stack(list(stats.keep.values()), dim=1).tolist()
    assert 0 < sum(c_trained) < len(steps)  # both kinds of step occur
    assert c_trained == python_trained
    assert c_keep == python_keep


def test_step_driver_finds_and_measures_its_cases(tmp_path):
    torch.manual_seed(0)
    shape = (6, 100)
    net = models.build("har", input_shape=shape)
    out = tmp_path / "har"
    export_c(net, tinyprop.TinyPropConfig("tinypropv2"), out, shape, OptimizerSpec("adam", 0.003))
    # the benchmark's HAR warm-up (benchmarks/runtime_bench.py), a shorter run
    flags = ["-DWARMUP_EPOCHS=2", "-DWARMUP_LR=0.05", "-DWARMUP_NOISE=1.0f", "-DMEAN_SAMPLES=16"]
    program = build_driver(tmp_path, "bench_step", out, flags)
    run = subprocess.run([str(program)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "found trained 1 skipped 1" in run.stdout
    regions = {line.split()[1]: line.split() for line in run.stdout.splitlines()
               if line.startswith("region ")}  # fmt: skip
    for name in ("full_trained", "topk_trained", "tinypropv2_trained", "tinypropv2_skipped"):
        assert name in regions
    assert regions["full_trained"][3] == "1" and regions["tinypropv2_skipped"][3] == "0"
    # full keeps every output entry; top-k 0.1 a tenth of each trainable layer's
    full_keep = [int(v) for v in regions["full_trained"][10:]]
    topk_keep = [int(v) for v in regions["topk_trained"][10:]]
    assert topk_keep == [max(1, int(n * 0.1 + 0.5)) for n in full_keep]
