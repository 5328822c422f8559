"""Two versions of ``kernels.c`` on the small CNN, in one process: the pooled top-k call for call,
then whole training steps chunk by chunk.

Separate processes on the shared machine differ by more than a kernel change saves; here both
libraries are loaded side by side (``kernels.c`` at a git revision and as it is in the working
tree, built as tinyprop builds it) and alternated:

1. ``tp_pooled_topk_f32`` on each fused block's inputs captured in a ``topk`` 0.05 step, the
   caches flushed before each call (as a step's forward leaves them): least and median process
   time per version, and whether both gave the same entries, values and sums bit for bit;
2. training steps (``topk`` 0.05, or ``--policy``) as ``benchmarks/speed.py`` runs them (a
   fresh model per episode, 25 distinct batches, chunks of 5 steps, the first chunk untimed),
   the old library, the new one and
   ``full`` taking turns chunk by chunk: per-step time, the paired ratio new / old, and whether
   both ended with the same weights bit for bit.

Run:
    python benchmarks/small_cnn_ab.py --old main
    python benchmarks/small_cnn_ab.py --old HEAD~1 --episodes 12 --threads 2
    python benchmarks/small_cnn_ab.py --old main --policy tinypropv2
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from fused_block import captured_blocks
from kernel_ab import compiled, source_at
from speed import MODELS, keep_freed_memory, optimizer_for
from torch import nn

import tinyprop
from tinyprop import data, functional, native
from tinyprop.native import build

MODEL = "small CNN 16-32-32"


def libraries(old: str) -> dict[str, ctypes.CDLL]:
    """The kernels at git revision ``old`` and in the working tree, each set up as
    ``native.library()`` sets up its own."""
    source = source_at(old)
    new = native.library()
    built = compiled(source, Path(tempfile.mkdtemp()), "old")
    load = build.load
    build.load = lambda: built
    try:
        old_library = native.library.__wrapped__()  # the argument types set as for the new
    finally:
        build.load = load
    return {"old": old_library, "new": new}


def pooled_calls(libs: dict, x, y, batch: int, calls: int) -> None:
    flush = torch.empty(8 << 20)
    for grad, pooled, indices, shape in captured_blocks(x, y, batch, "topk 0.05"):
        channels, size = shape[1], shape[1] * shape[2] * shape[3]
        keep = functional.fixed_keep_count(0.05, size)
        times, outputs = {"old": [], "new": []}, {}
        for call in range(2 * calls):
            name = ("old", "new")[call % 2] if call // 2 % 2 else ("new", "old")[call % 2]
            outputs[name] = out = (
                torch.empty(batch * keep, dtype=torch.long), torch.empty(batch * keep),
                torch.empty(batch), torch.empty(channels),
            )  # fmt: skip
            scratch, index = torch.empty(3 * size), torch.empty(size, dtype=torch.long)
            plane_sums = torch.empty(2 * batch * channels, dtype=torch.float64)
            flush.fill_(1.0)
            start = time.process_time()
            status = libs[name].tp_pooled_topk_f32(
                grad.data_ptr(), pooled.data_ptr(), indices.data_ptr(), batch, channels,
                pooled.shape[2] * pooled.shape[3], shape[2] * shape[3], keep,
                out[0].data_ptr(), out[1].data_ptr(), plane_sums.data_ptr(), out[2].data_ptr(),
                out[3].data_ptr(), scratch.data_ptr(), index.data_ptr(), 1,
            )  # fmt: skip
            times[name].append(1000 * (time.process_time() - start))
            assert status == 0, status
        same = all(
            torch.equal(a.view(torch.int32) if a.is_floating_point() else a,
                        b.view(torch.int32) if b.is_floating_point() else b)
            for a, b in zip(outputs["old"], outputs["new"], strict=True)
        )  # fmt: skip
        figures = ", ".join(
            f"{name} {min(t):.3f} / {statistics.median(t):.3f}" for name, t in times.items()
        )
        print(f"pooled top-k {tuple(shape)}, k = {keep}, ms least / median: {figures}; "
              f"same output: {same}")  # fmt: skip


def steps(libs: dict, x, y, batch: int, episodes: int, threads: int, policy: str) -> None:
    build_model, _, _, policies = MODELS[MODEL]
    clock = time.process_time if threads == 1 else time.perf_counter
    loss = nn.CrossEntropyLoss(reduction="none")
    times: dict[str, list[float]] = {"old": [], "new": [], "full": []}
    same = True
    library = native.library
    try:
        for episode in range(episodes):
            runs = {}
            for name in times:
                config = "full" if name == "full" else policy
                torch.manual_seed(0)
                model = tinyprop.apply(build_model(), policies[config])
                runs[name] = (model, optimizer_for(config, model))
            order = list(times)[episode % 3 :] + list(times)[: episode % 3]
            for chunk in range(5):
                for name in order:
                    lib = libs["old" if name == "old" else "new"]
                    native.library = lambda lib=lib: lib
                    model, optimizer = runs[name]
                    start = clock()
                    for index in range(5 * chunk, 5 * chunk + 5):
                        rows = slice(index * batch, (index + 1) * batch)
                        tinyprop.train_step(model, x[rows], y[rows], loss, optimizer)
                    if chunk:
                        times[name].append(1000 * (clock() - start) / 5)
            same &= all(
                torch.equal(a, b)
                for a, b in zip(
                    runs["old"][0].parameters(), runs["new"][0].parameters(), strict=True
                )
            )
    finally:
        native.library = library
    median = {name: statistics.median(t) for name, t in times.items()}
    paired = statistics.median(n / o for n, o in zip(times["new"], times["old"], strict=True))
    print(f"{policy} steps, {threads} thread(s), {episodes} episodes, ms per step (median): "
          f"old {median['old']:.2f}, new {median['new']:.2f}, full {median['full']:.2f}; "
          f"new / old paired {paired:.3f}; of full: old {median['old'] / median['full']:.3f}, "
          f"new {median['new'] / median['full']:.3f}; same weights: {same}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--old", default="main", help="git revision of the old kernels.c")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calls", type=int, default=30, help="pooled top-k calls per version")
    parser.add_argument("--episodes", type=int, default=8, help="25-step runs per version")
    parser.add_argument("--policy", default="topk 0.05", help="the policy of the timed steps")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    _, batch, _, _ = MODELS[MODEL]
    x, y = data.load("mnist", "train", limit=batch * 25).tensors  # (N, 1, 28, 28)
    libs = libraries(args.old)
    print(f"load {os.getloadavg()[0]:.1f} at the start")
    pooled_calls(libs, x, y, batch, args.calls)
    steps(libs, x, y, batch, args.episodes, args.threads, args.policy)
    print(f"load {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
