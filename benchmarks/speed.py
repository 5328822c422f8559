"""Wall-clock per training step: full vs topk (0.1, 0.05) vs tinypropv2, side by side.

The machine may be shared and noisy, so the policies are measured in one run, interleaved:
every policy trains its own model (same initial weights, same batches) in chunks of steps,
round-robin, and the per-step time is the median over chunks. What counts is the ratio to
``full`` measured in the same run, not the absolute time.

One torch thread by default: on a shared 2-core machine a second thread oversubscribes the
cores and makes every timing erratic (``--threads 0`` uses torch's default).

Run:
    python benchmarks/speed.py                 # both models, writes benchmarks/results/speed.json
    python benchmarks/speed.py --rounds 3      # quicker, noisier
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
from torch import nn

import tinyprop
from tinyprop import data, native

POLICIES = {
    "full": tinyprop.TinyPropConfig(policy="full"),
    "topk 0.1": tinyprop.TinyPropConfig(policy="topk", ratio=0.1),
    "topk 0.05": tinyprop.TinyPropConfig(policy="topk", ratio=0.05),
    "tinypropv2": tinyprop.TinyPropConfig(policy="tinypropv2"),
}


def wide_mlp() -> nn.Module:
    """784-2048-2048-10: wide enough that the backward's matrix products dominate."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 2048),
        nn.ReLU(),
        nn.Linear(2048, 2048),
        nn.ReLU(),
        nn.Linear(2048, 10),
    )


def small_cnn() -> nn.Module:
    """Three 3x3 conv layers (16, 32, 32 channels) with pooling and a linear head."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # (B, 16, 14, 14)
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # (B, 32, 7, 7)
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),  # (B, 32, 7, 7)
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 10),
    )


HEADER = (
    "| policy     | ms / step | wall vs full | MACs total vs full | backward MACs vs full "
    "| skipped |\n|------------|-----------|--------------|--------------------"
    "|-----------------------|---------|"
)
MODELS = {"wide MLP 784-2048-2048-10": wide_mlp, "small CNN 16-32-32": small_cnn}


def measure(build, x, y, batch_size: int, rounds: int, chunk: int) -> dict[str, dict]:
    """Per-step wall time of every policy, interleaved in chunks of ``chunk`` steps."""
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    runs = {}
    for name, config in POLICIES.items():
        torch.manual_seed(0)
        model = tinyprop.apply(build(), config)
        runs[name] = {
            "model": model,
            "optimizer": torch.optim.SGD(model.parameters(), lr=0.01),  # plain SGD, as on an MCU
            "times": [],
            "ledger": tinyprop.Ledger(),
            "skipped": 0,
            "seen": 0,
            "next": 0,
        }
    steps = len(x) // batch_size
    for _ in range(rounds):
        for run in runs.values():
            start = time.perf_counter()
            for _ in range(chunk):
                index = slice(run["next"] * batch_size, (run["next"] + 1) * batch_size)
                stats = tinyprop.train_step(
                    run["model"], x[index], y[index], loss_fn, run["optimizer"]
                )
                run["ledger"] += stats.macs
                run["skipped"] += stats.skipped
                run["seen"] += batch_size
                run["next"] = (run["next"] + 1) % steps
            run["times"].append((time.perf_counter() - start) / chunk)
    full = statistics.median(runs["full"]["times"])
    results = {}
    for name, run in runs.items():
        per_step = statistics.median(run["times"])
        results[name] = {
            "ms_per_step": 1000 * per_step,
            "ratio_to_full": per_step / full,
            "mac_ratio": run["ledger"].ratio(),
            "backward_mac_ratio": run["ledger"].backward_ratio(),
            "skip_rate": run["skipped"] / run["seen"],
        }
    return results


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory in the process instead of returning it to the OS.

    Every training step allocates fresh gradient buffers (16 MB for a 2048x2048 weight). With
    glibc's defaults, buffers this large are mapped and unmapped every step, and touching the new
    pages costs several milliseconds of page faults per buffer, for every policy alike. Training
    loops avoid this with an allocator setting; so does this benchmark (applied to all policies).
    Returns whether the setting was applied (False on a non-glibc system).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(
        libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024)
        and libc.mallopt(m_trim_threshold, 1024 * 1024 * 1024)
    )


def commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=12, help="chunks per policy")
    parser.add_argument("--chunk", type=int, default=5, help="steps per chunk")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch default)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "speed.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    kept_memory = keep_freed_memory()
    train = data.load("mnist", "train", limit=args.batch_size * args.rounds * args.chunk)
    x, y = train.tensors
    record = {
        "command": "python benchmarks/speed.py",
        "commit": commit(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} "
        "torch threads, torch "
        f"{torch.__version__}",
        "batch_size": args.batch_size,
        "glibc_keeps_freed_memory": kept_memory,
        "native_kernels": native.library() is not None,
        "steps_per_policy": args.rounds * args.chunk,
        "models": {},
    }
    for model_name, build in MODELS.items():
        results = measure(build, x, y, args.batch_size, args.rounds, args.chunk)
        record["models"][model_name] = results
        print(f"\n{model_name}, batch {args.batch_size}, MNIST")
        print(HEADER)
        for name, row in results.items():
            print(
                f"| {name:<10} | {row['ms_per_step']:>9.2f} | {row['ratio_to_full']:>12.2f} | "
                f"{row['mac_ratio']:>18.3f} | {row['backward_mac_ratio']:>21.3f} | "
                f"{100 * row['skip_rate']:>6.1f}% |"
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
