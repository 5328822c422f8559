"""Wall-clock per training step: full vs topk (0.1, 0.05, unified, fused SGD) vs tinypropv2.

The machine may be shared and noisy, so the policies are measured in one run, interleaved:
every policy trains its own model (same initial weights, same batches) in chunks of steps,
round-robin. Each round gives one ratio per policy (its chunk's time over ``full``'s chunk of
the same round; the rows under SGD with momentum over ``full, SGD momentum``'s chunk); the
table shows the median ratio and its spread (lowest and highest round).
What counts is the ratio to ``full`` measured in the same run, not the absolute time. Beside
each ratio: the MAC limit, the ratio the step would have if its wall time followed its
multiply-accumulates (the ledger's total vs full). Under the table: the kernel each layer's
backward ran in the last step (``StepStats.kernels``).

Every model is measured at torch's default thread count and at one thread (``--threads``).

Run:
    python benchmarks/speed.py                 # all models, writes benchmarks/results/speed.json
    python benchmarks/speed.py --rounds 4      # quicker, noisier
    python benchmarks/speed.py --models "small CNN 16-32-32" --threads 1
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
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
    "topk 0.05 unified": tinyprop.TinyPropConfig(policy="topk", ratio=0.05, unified=True),
}
# the same policy, run by train_step(fused_update=True): SGD updates the sparse Linear weights
# from the kept entries, without a dense weight gradient
FUSED_UPDATE = "topk 0.05 fused SGD"
POLICIES[FUSED_UPDATE] = POLICIES["topk 0.05"]
# SGD with momentum 0.9 instead of plain SGD: full, and the fused update (which then also steps
# the momentum buffers); the fused row's ratio is against the full row with the same optimizer
FULL_MOMENTUM = "full, SGD momentum"
FUSED_MOMENTUM = "topk 0.05 fused, SGD momentum"
POLICIES[FULL_MOMENTUM] = POLICIES["full"]
POLICIES[FUSED_MOMENTUM] = POLICIES["topk 0.05"]
FUSED = (FUSED_UPDATE, FUSED_MOMENTUM)  # rows run with train_step(fused_update=True)
MOMENTUM = {FULL_MOMENTUM: 0.9, FUSED_MOMENTUM: 0.9}  # row -> SGD momentum (else 0)
REFERENCE = {FUSED_MOMENTUM: FULL_MOMENTUM}  # row -> the row its ratio is against (else full)
# CNNs also: convolutions with a fan-in below 64 backpropagated densely (no selection there);
# not the fused SGD update (it fuses only their small Linear head)
CNN_POLICIES = {
    **{name: config for name, config in POLICIES.items() if name not in (*FUSED, FULL_MOMENTUM)},
    "topk 0.05 dense-small": POLICIES["topk 0.05"].replace(dense_small_layers=True),
    "tinypropv2 dense-small": POLICIES["tinypropv2"].replace(dense_small_layers=True),
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


def deep_mlp() -> nn.Module:
    """1024-2048-2048-2048-10 on MNIST padded to 32x32 (batch 64)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(1024, 2048),
        nn.ReLU(),
        nn.Linear(2048, 2048),
        nn.ReLU(),
        nn.Linear(2048, 2048),
        nn.ReLU(),
        nn.Linear(2048, 10),
    )


def separable(channels_in: int, channels_out: int, stride: int) -> list[nn.Module]:
    """MobileNet's block: 3x3 depthwise, then 1x1 pointwise, each with BatchNorm and ReLU."""
    return [
        nn.Conv2d(channels_in, channels_in, 3, stride, 1, groups=channels_in, bias=False),
        nn.BatchNorm2d(channels_in),
        nn.ReLU(),
        nn.Conv2d(channels_in, channels_out, 1, bias=False),
        nn.BatchNorm2d(channels_out),
        nn.ReLU(),
    ]


def mobilenet_style() -> nn.Module:
    """A MobileNet-style CNN: a strided 3x3 conv, four depthwise-separable blocks, global
    average pooling and a linear head (28x28 -> 14 -> 7 -> 4)."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, 2, 1, bias=False),  # (B, 32, 14, 14)
        nn.BatchNorm2d(32),
        nn.ReLU(),
        *separable(32, 64, 1),
        *separable(64, 128, 2),  # (B, 128, 7, 7)
        *separable(128, 128, 1),
        *separable(128, 256, 2),  # (B, 256, 4, 4)
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(256, 10),
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
    "| policy                 | ms / step | wall vs full (spread)  | MAC limit "
    "| backward MACs vs full | skipped |\n|------------------------|-----------"
    "|------------------------|-----------|-----------------------|---------|"
)


def padded_mnist(side: int, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``limit`` MNIST training images, zero-padded from 28x28 to ``side`` x
    ``side`` as a model of :data:`MODELS` takes them, and their labels: (N, 1, side, side), (N,)."""
    x, y = data.load("mnist", "train", limit=limit).tensors  # (N, 1, 28, 28)
    return pad_to_side(x, side), y


def pad_to_side(images: torch.Tensor, side: int) -> torch.Tensor:
    """(N, 1, 28, 28) images zero-padded on every border to (N, 1, side, side)."""
    pad = (side - images.shape[-1]) // 2
    return torch.nn.functional.pad(images, (pad,) * 4) if pad else images


# name -> (builder, batch size, input side: MNIST's 28x28, or zero-padded to 32x32, policies)
MODELS = {
    "wide MLP 784-2048-2048-10": (wide_mlp, 128, 28, POLICIES),
    "deep MLP 1024-2048-2048-2048-10": (deep_mlp, 64, 32, POLICIES),
    "small CNN 16-32-32": (small_cnn, 128, 28, CNN_POLICIES),
    "MobileNet-style CNN": (mobilenet_style, 64, 28, CNN_POLICIES),
}


def measure(build, policies, x, y, batch_size: int, rounds: int, chunk: int) -> dict[str, dict]:
    """Per-step wall time of every policy, interleaved in chunks of ``chunk`` steps (one
    untimed warm-up chunk each first)."""
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    runs = {}
    for name, config in policies.items():
        torch.manual_seed(0)
        model = tinyprop.apply(build(), config)
        runs[name] = {
            "model": model,
            "optimizer": optimizer_for(name, model),
            "times": [],
            "ledger": tinyprop.Ledger(),
            "skipped": 0,
            "seen": 0,
            "next": 0,
            "kernels": {},
        }
    steps = len(x) // batch_size
    for round_index in range(rounds + 1):
        for name, run in runs.items():
            if round_index == 0:  # warm-up: kernels compiled, buffers allocated
                run["ledger"], run["skipped"], run["seen"] = tinyprop.Ledger(), 0, 0
            start = time.perf_counter()
            for _ in range(chunk):
                index = slice(run["next"] * batch_size, (run["next"] + 1) * batch_size)
                stats = tinyprop.train_step(
                    run["model"], x[index], y[index], loss_fn, run["optimizer"],
                    fused_update=name in FUSED,
                )  # fmt: skip
                run["ledger"] += stats.macs
                run["kernels"] = stats.kernels  # layer -> the kernel its backward ran
                run["skipped"] += stats.skipped
                run["seen"] += batch_size
                run["next"] = (run["next"] + 1) % steps
            if round_index > 0:
                run["times"].append((time.perf_counter() - start) / chunk)
    results = {}
    for name, run in runs.items():
        per_step = statistics.median(run["times"])
        reference = runs[REFERENCE.get(name, "full")]["times"]
        ratios = [t / f for t, f in zip(run["times"], reference, strict=True)]
        results[name] = {
            "ms_per_step": 1000 * per_step,
            "ratio_to_full": statistics.median(ratios),
            "ratio_spread": [min(ratios), max(ratios)],
            "mac_ratio": run["ledger"].ratio(),
            "backward_mac_ratio": run["ledger"].backward_ratio(),
            "skip_rate": run["skipped"] / run["seen"],
            "kernels": run["kernels"],
        }
    return results


def optimizer_for(name: str, model: nn.Module) -> torch.optim.Optimizer:
    """The row's optimizer: plain SGD, as on an MCU, or SGD with momentum (``MOMENTUM``)."""
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=MOMENTUM.get(name, 0.0))


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


def load_average(start: float) -> str:
    """The 1-minute load average at the start and at the end of the run (other processes
    competing for the cores make every ratio noisier)."""
    return f"{start:.2f} at the start, {os.getloadavg()[0]:.2f} at the end"


def write_record(record: dict, out: str, start_load: float) -> None:
    """Write ``record`` as JSON to ``out`` with the run's load average, and say where."""
    record["load_average"] = load_average(start_load)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {out} (load average {record['load_average']})")


def thread_counts(text: str) -> list[int]:
    """``"0,1"`` -> torch's default thread count and one thread, e.g. [2, 1]."""
    default = torch.get_num_threads()
    counts = [int(part) or default for part in text.split(",")]
    if any(count < 1 for count in counts):
        raise argparse.ArgumentTypeError(f"thread counts must be >= 0 (0: default), got {text}")
    return list(dict.fromkeys(counts))


def add_timing_arguments(parser: argparse.ArgumentParser) -> None:
    """--rounds, --chunk and --threads of the wall-clock scripts."""
    parser.add_argument("--rounds", type=int, default=8, help="timed chunks per policy")
    parser.add_argument("--chunk", type=int, default=5, help="steps per chunk")
    parser.add_argument(
        "--threads", type=thread_counts, default="0,1", help="torch threads, 0: torch's default"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_timing_arguments(parser)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "speed.json"))
    args = parser.parse_args()
    start_load = os.getloadavg()[0]
    kept_memory = keep_freed_memory()
    largest_batch = max(MODELS[name][1] for name in args.models)  # (MNIST, not the padding)
    train = data.load("mnist", "train", limit=largest_batch * (args.rounds + 1) * args.chunk)
    images, y = train.tensors  # (N, 1, 28, 28)
    record = {
        "command": "python " + " ".join(sys.argv),
        "commit": commit(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"default {torch.get_num_threads()} torch threads",
        "glibc_keeps_freed_memory": kept_memory,
        "native_kernels": native.library() is not None,
        "steps_per_policy": args.rounds * args.chunk,
        "threads": {},
    }
    for threads in args.threads:
        torch.set_num_threads(threads)
        record["threads"][str(threads)] = models = {}
        for model_name in args.models:
            build, batch_size, side, policies = MODELS[model_name]
            x = pad_to_side(images, side)
            results = measure(build, policies, x, y, batch_size, args.rounds, args.chunk)
            models[model_name] = {"batch_size": batch_size, "policies": results}
            print(f"\n{model_name}, batch {batch_size}, MNIST {side}x{side}, {threads} threads")
            print(HEADER)
            for name, row in results.items():
                spread = "{:.2f} ({:.2f}-{:.2f})".format(row["ratio_to_full"], *row["ratio_spread"])
                print(
                    f"| {name:<22} | {row['ms_per_step']:>9.2f} | {spread:>22} | "
                    f"{row['mac_ratio']:>9.3f} | {row['backward_mac_ratio']:>21.3f} | "
                    f"{100 * row['skip_rate']:>6.1f}% |"
                )
            for name, row in results.items():  # the ledger counts k · fan-in whichever ran
                kernels = "; ".join(f"{layer}: {kind}" for layer, kind in row["kernels"].items())
                print(f"  {name} kernels by layer: {kernels or 'PyTorch dense backward'}")
    write_record(record, args.out, start_load)


if __name__ == "__main__":
    main()
