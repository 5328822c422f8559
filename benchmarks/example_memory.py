"""Memory of the exported example program fed a dataset larger than a microcontroller's SRAM:
its static RAM (data + bss: training arena, model struct, input buffer) and its peak resident
memory on the host while it trains on every record of a samples.bin.

    python benchmarks/example_memory.py                       # MNIST MLP, batch 256, 20,000 samples
    python benchmarks/example_memory.py --batch-size 32 --samples 5000

The model is the MNIST MLP reference model (784 inputs), tinypropv2, SGD; the samples are
random (memory does not depend on their values). Needs gcc, make, binutils' size and GNU
time (/usr/bin/time; scripts/install-system-deps.sh installs it).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

import tinyprop
from tinyprop import models
from tinyprop.export import OptimizerSpec, export_c

TIME = "/usr/bin/time"  # GNU time (Debian: time)


def measure(batch_size: int, samples: int, work: Path) -> dict:
    torch.manual_seed(0)
    shape = (1, 28, 28)
    net = models.build("mnist", input_shape=shape)
    config = tinyprop.TinyPropConfig("tinypropv2")
    result = export_c(net, config, work / "mnist", shape, OptimizerSpec("sgd", 0.01), batch_size)
    subprocess.run(["make", "-s", "-C", str(result.out_dir)], check=True)
    program = result.out_dir / "train"
    size = subprocess.run(["size", str(program)], capture_output=True, text=True, check=True)
    text, data, bss = (int(v) for v in size.stdout.splitlines()[1].split()[:3])
    generator = np.random.default_rng(0)
    data_file = work / "samples.bin"
    with open(data_file, "wb") as handle:
        for start in range(0, samples, 1000):
            count = min(1000, samples - start)
            x = generator.standard_normal((count, 784)).astype(np.float32)
            labels = (np.arange(start, start + count) % 10).astype(np.int32)
            handle.write(np.concatenate([x, labels.view(np.float32)[:, None]], axis=1).tobytes())
    # GNU time: a process started from Python keeps Python's peak in its ru_maxrss
    with open(data_file, "rb") as stdin:
        run = subprocess.run(
            [TIME, "-f", "%M", str(program)], stdin=stdin, capture_output=True, text=True
        )
    output = run.stdout
    batches = sum(line.startswith("batch ") for line in output.splitlines())
    return {
        "batch_size": batch_size,
        "samples": samples,
        "samples_bin_bytes": data_file.stat().st_size,
        "exit_code": run.returncode,
        "batches": batches,
        "training_arena_bytes": result.arena_bytes,
        "static_ram_bytes": data + bss,  # arena, tp_model, the input buffer, the program's own
        "peak_rss_kib": int(run.stderr.split()[-1]),  # the program's maximum resident set
        "last_line": output.strip().splitlines()[-1] if output.strip() else "",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--samples", type=int, default=20000)
    args = parser.parse_args(argv)
    if shutil.which(TIME) is None:
        print(f"{TIME} not found: apt-get install -y time (scripts/install-system-deps.sh)")
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        record = measure(args.batch_size, args.samples, Path(tmp))
    for key, value in record.items():
        print(f"{key:>22}: {value}")
    return 0 if record["exit_code"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
