"""DistributedDataParallel: 2 CPU processes, gloo. tinypropv2 skips most samples, so a rank
often skips its whole batch while the other trains: every rank must still join the gradient
all-reduce (no deadlock) and the weights must stay identical on both ranks. A NaN on one rank
makes every rank raise after the all-reduce. Gradient accumulation with no_sync and
find_unused_parameters=True give plain PyTorch's weights."""

import contextlib
import copy
import datetime
import json
import os
import sys
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from core_models import mlp
from torch import nn

import tinyprop

WORLD = 2
STEPS = 100
BATCH = 2  # per rank
LOSS = nn.CrossEntropyLoss(reduction="none")
WAYS = ("train_step", "tinyprop.backward", "tinyprop.loss().backward()")
# seconds for the whole job; a deadlock fails the test instead of hanging it. Both ranks import
# torch and tinyprop first: 37-90 s on 2 cores at load 9-10 (tests/lightning_ddp_job.py), so 120
# left too little margin on a loaded machine
TIMEOUT = 300


def train(way: str, rank: int) -> dict:
    """STEPS steps of tinypropv2 under DDP; what each step trained on each rank."""
    torch.manual_seed(0)  # the same initial weights on both ranks
    config = tinyprop.TinyPropConfig(policy="tinypropv2", skip_threshold=0.95)
    model = nn.parallel.DistributedDataParallel(tinyprop.apply(mlp(), config))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(1000 + rank)  # each rank its own data
    trained = []
    for _ in range(STEPS):
        x = torch.randn(BATCH, 12, generator=generator)
        y = x[:, :5].argmax(1)  # learnable: the output errors fall and most samples skip
        if way == "train_step":
            stats = tinyprop.train_step(model, x, y, LOSS, optimizer)
        else:
            optimizer.zero_grad()
            losses = LOSS(model(x), y)
            if way == "tinyprop.backward":
                stats = tinyprop.backward(model, losses)
            else:
                tinyprop.loss(model, losses).backward()
                stats = tinyprop.step_stats(model)
            count = torch.tensor([stats.trained])
            dist.all_reduce(count)  # step on every rank when any rank trained
            if int(count):
                optimizer.step()
        trained.append(stats.trained)
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.zeros_like(weights) for _ in range(WORLD)]
    dist.all_gather(gathered, weights)
    counts = torch.tensor(trained)
    all_counts = [torch.zeros_like(counts) for _ in range(WORLD)]
    dist.all_gather(all_counts, counts)
    alone = sum(int(c.eq(0).any() and c.gt(0).any()) for c in torch.stack(all_counts).T)
    return {
        "weight_difference": float((gathered[0] - gathered[1]).abs().max()),
        "weight_change": float((weights - initial_weights()).abs().max()),
        "trained": sum(trained),
        "steps_one_rank_skipped_all": alone,
    }


def train_uneven(rank: int) -> float:
    """Uneven inputs under ``with model.join()``: rank 0 has 6 batches, rank 1 has 3.
    train_step's all-reduce of the trained count used to break the join (gloo abort)."""
    torch.manual_seed(0)
    config = tinyprop.TinyPropConfig(policy="tinypropv2", skip_threshold=0.95)
    model = nn.parallel.DistributedDataParallel(tinyprop.apply(mlp(), config))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(1000 + rank)
    with model.join():
        for _ in range(6 if rank == 0 else 3):
            x = torch.randn(BATCH, 12, generator=generator)
            tinyprop.train_step(model, x, x[:, :5].argmax(1), LOSS, optimizer)
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.zeros_like(weights) for _ in range(WORLD)]
    dist.all_gather(gathered, weights)  # join ends with the last rank's weights on every rank
    return float((gathered[0] - gathered[1]).abs().max())


class Sqrt(nn.Module):
    """sqrt(|h|): its gradient is not finite where h = 0."""

    def forward(self, h):
        return h.abs().sqrt()


def train_with_a_nan_on_one_rank(way: str, rank: int) -> dict:
    """Step 1: a NaN δ on rank 0 alone (its first layer zeroed for that step: sqrt at 0);
    step 2: a NaN loss on rank 1 alone (a NaN input). Each raised FloatingPointError on its
    rank alone, inside or before the backward: the other rank waited in the gradient
    all-reduce until the timeout, and a loop going on after the error broke DDP ('Expected
    to have finished reduction in the prior iteration')."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 8), Sqrt(), nn.Linear(8, 5))
    model = nn.parallel.DistributedDataParallel(
        tinyprop.apply(net, tinyprop.TinyPropConfig(policy="topk", ratio=0.5))
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(rank)
    outcomes, weights = [], []
    for step in range(4):
        x = torch.randn(BATCH, 12, generator=generator)
        y = x[:, :5].argmax(1)
        kept = [p.detach().clone() for p in net[0].parameters()]
        if step == 1 and rank == 0:
            with torch.no_grad():
                for parameter in net[0].parameters():
                    parameter.zero_()
        if step == 2 and rank == 1:
            x[0, 0] = float("nan")
        try:
            if way == "train_step":
                tinyprop.train_step(model, x, y, LOSS, optimizer)
            else:
                optimizer.zero_grad()
                tinyprop.backward(model, LOSS(model(x), y))
                optimizer.step()
            outcomes.append("ok")
        except FloatingPointError:
            outcomes.append("raised")
        if step == 1 and rank == 0:
            with torch.no_grad():
                for parameter, value in zip(net[0].parameters(), kept, strict=True):
                    parameter.copy_(value)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    gathered = [torch.zeros_like(weights[-1]) for _ in range(WORLD)]
    dist.all_gather(gathered, weights[-1])
    return {
        "outcomes": outcomes,
        "unchanged_while_raising": bool(torch.equal(weights[0], weights[2])),
        "weight_difference": float((gathered[0] - gathered[1]).abs().max()),
    }


class WithUnusedHead(nn.Module):
    """The MLP with an auxiliary head the loss takes in every other step only."""

    def __init__(self):
        super().__init__()
        self.body = mlp()
        self.aux = nn.Linear(5, 2)

    def forward(self, x, use_aux: bool):
        out = self.body(x)
        return out + self.aux(out).sum(1, keepdim=True) if use_aux else out


def as_in_pytorch(rank: int) -> dict:
    """``topk`` at 1.0 against plain PyTorch, both under DDP, on the same data: gradient
    accumulation with ``model.no_sync()`` (two micro-batches, ``scale=1/2``), and
    ``find_unused_parameters=True`` with a head the loss leaves out every other step. The
    largest weight difference after 4 SGD steps of each."""
    config = tinyprop.TinyPropConfig(policy="topk", ratio=1.0)
    differences = {}
    for case in ("no_sync", "find_unused_parameters"):
        torch.manual_seed(0)
        net = mlp() if case == "no_sync" else WithUnusedHead()
        plain = copy.deepcopy(net)  # the PyTorch reference
        unused = case == "find_unused_parameters"
        pair = [
            nn.parallel.DistributedDataParallel(module, find_unused_parameters=unused)
            for module in (tinyprop.apply(net, config), plain)
        ]
        optimizers = [torch.optim.SGD(model.parameters(), lr=0.1) for model in pair]
        generator = torch.Generator().manual_seed(2000 + rank)
        for step in range(4):
            halves = [torch.randn(BATCH, 12, generator=generator) for _ in range(2)]
            for model, optimizer in zip(pair, optimizers, strict=True):
                optimizer.zero_grad()
                reference = model is pair[1]  # plain PyTorch (else the applied model)
                if case == "no_sync":
                    for half, x in enumerate(halves):
                        losses = LOSS(model(x), x[:, :5].argmax(1))
                        with model.no_sync() if half == 0 else contextlib.nullcontext():
                            if reference:
                                (losses.mean() / 2).backward()
                            else:
                                tinyprop.backward(model, losses, scale=0.5)
                else:
                    x = halves[0]
                    losses = LOSS(model(x, step % 2 == 0), x[:, :5].argmax(1))
                    if reference:
                        losses.mean().backward()
                    else:
                        tinyprop.backward(model, losses)
                optimizer.step()
        differences[case] = max(
            float((a - b).abs().max())
            for a, b in zip(pair[0].parameters(), pair[1].parameters(), strict=True)
        )
    return differences


def initial_weights() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.cat([p.detach().flatten() for p in mlp().parameters()])


def warns_without_ddp() -> bool:
    model = tinyprop.apply(mlp(), tinyprop.TinyPropConfig(policy="topk"))
    x, y = torch.randn(BATCH, 12), torch.randint(0, 5, (BATCH,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tinyprop.backward(model, LOSS(model(x), y))
    return any("not wrapped in DistributedDataParallel" in str(w.message) for w in caught)


def worker(rank: int, folder: str) -> None:
    """One rank. Its stderr goes to ``rank{rank}.log`` (a crash in gloo's C++ code prints
    there only), and the ranks meet through a file in the test's own folder: a TCP store on
    a port picked in advance could be taken, or joined, by a job running at the same time."""
    log = os.open(os.path.join(folder, f"rank{rank}.log"), os.O_WRONLY | os.O_CREAT, 0o600)
    os.dup2(log, sys.stderr.fileno())
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method="file://" + os.path.join(folder, "store"),
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=TIMEOUT),
    )
    try:
        results = {way: train(way, rank) for way in WAYS}
        results["warns_without_ddp"] = warns_without_ddp()
        results["uneven_weight_difference"] = train_uneven(rank)
        results["nan"] = {way: train_with_a_nan_on_one_rank(way, rank) for way in WAYS[:2]}
        results["as_in_pytorch"] = as_in_pytorch(rank)
        with open(os.path.join(folder, f"rank{rank}.json"), "w") as file:
            json.dump(results, file)
        dist.barrier()  # both ranks done before either tears gloo down
    finally:
        dist.destroy_process_group()
    end_without_finalizing()


def end_without_finalizing() -> None:
    """End a rank that finished its work without the interpreter's finalization.
    destroy_process_group leaves gloo's worker threads running (two pt_gloo_runloop threads
    and gloo_tcp_loop, still there after it and a gc.collect), and a worker drops its last
    reference to a collective's tensors after the waiting rank has woken up. When a tensor
    Python made is freed there while the interpreter finalizes (the worker descheduled under
    load), taking the GIL ends that thread, and the C++ code it unwinds through aborts the
    process: "terminate called without an active exception", SIGABRT, the flake seen under
    concurrent suites (two ranks whose all_gather is still pending at exit abort so in 6 of
    8 runs). Nothing is left to finalize: the results are written and flushed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def rank_logs(folder) -> str:
    """The end of each rank's stderr, for the failure message."""
    parts = []
    for rank in range(WORLD):
        path = folder / f"rank{rank}.log"
        text = path.read_text(errors="replace")[-3000:] if path.exists() else "(no log)"
        parts.append(f"--- rank {rank} stderr ---\n{text}")
    return "\n".join(parts)


def test_ddp_two_ranks_skipping_most_samples_keep_identical_weights(tmp_path):
    start = time.monotonic()
    context = mp.start_processes(
        worker, args=(str(tmp_path),), nprocs=WORLD, join=False, start_method="spawn"
    )
    try:
        while not context.join(timeout=1):
            if time.monotonic() - start > TIMEOUT:
                for process in context.processes:
                    process.kill()
                raise AssertionError(f"the DDP job did not finish in {TIMEOUT} s (deadlock?)")
    except Exception as error:  # a rank failed: show what each rank printed
        raise AssertionError(f"{error}\n{rank_logs(tmp_path)}") from error
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(WORLD)]
    for rank, result in enumerate(results):
        assert result["warns_without_ddp"], rank
        assert result["uneven_weight_difference"] == 0.0, rank
        # no_sync accumulation and find_unused_parameters: plain PyTorch's weights (untested)
        assert max(result["as_in_pytorch"].values()) < 1e-6, result["as_in_pytorch"]
        for way, got in result["nan"].items():  # every rank raises at both steps, then trains
            assert got == {
                "outcomes": ["ok", "raised", "raised", "ok"],
                "unchanged_while_raising": True,
                "weight_difference": 0.0,
            }, (rank, way)
        for way in WAYS:
            got = result[way]
            assert got["weight_difference"] == 0.0, (way, got)
            assert got["weight_change"] > 0.0, (way, got)  # it did train
            # most samples skipped, and steps where one rank skipped its whole batch while
            # the other trained (the case that deadlocked)
            assert 0 < got["trained"] < STEPS * BATCH / 2, (way, got)
            assert got["steps_one_rank_skipped_all"] > 10, (way, got)
    print(f"DDP job {time.monotonic() - start:.1f} s:", json.dumps(results[0]))
