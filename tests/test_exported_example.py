"""The exported example program as a user builds and feeds it: its own Makefile (also for a
model with more runtime layers than the runtime's default limit), one sample held in memory
whatever the batch size, and a samples.bin with hostile records (a label outside the classes,
NaN and infinite values) stopped with a line naming the record and the status, under
AddressSanitizer and UBSan."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import torch
from torch import nn

import tinyprop
from tinyprop.export import OptimizerSpec, export_c
from tinyprop.export.runtime import runtime_max_layers

# float-cast-overflow (undefined behaviour) is not part of -fsanitize=undefined
SANITIZE = [
    "-fsanitize=address,undefined,float-cast-overflow",
    "-fno-sanitize-recover=all",
    "-fno-omit-frame-pointer",
]

pytestmark = pytest.mark.skipif(
    shutil.which("gcc") is None or shutil.which("make") is None, reason="needs gcc and make"
)


def records(x: np.ndarray, y: np.ndarray) -> bytes:
    """samples.bin: per sample its float32 values, then its int32 label."""
    return b"".join(
        np.ascontiguousarray(sample, dtype=np.float32).tobytes() + np.int32(label).tobytes()
        for sample, label in zip(x, y, strict=True)
    )


def build(out, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "-s", "-C", str(out), *flags], capture_output=True, text=True, timeout=300
    )


def test_exported_makefile_builds_a_model_beyond_the_default_layer_limit(tmp_path):
    """The Makefile passed no -DTP_MAX_LAYERS: a model of more than 48 runtime layers
    stopped at the header's #error."""
    torch.manual_seed(0)
    hidden = [module for _ in range(30) for module in (nn.Linear(6, 6), nn.ReLU())]
    net = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), *hidden, nn.Linear(6, 3))
    config = tinyprop.TinyPropConfig("tinypropv2")
    result = export_c(net, config, tmp_path / "deep", (5,), OptimizerSpec("sgd", 0.05), 4)
    assert len(result.layers) == 63 > runtime_max_layers()
    made = build(result.out_dir)
    assert made.returncode == 0, made.stdout + made.stderr
    generator = np.random.default_rng(0)
    data = records(generator.standard_normal((10, 5)), np.arange(10) % 3)
    run = subprocess.run([str(result.out_dir / "train")], input=data, capture_output=True)
    out = run.stdout.decode()
    assert run.returncode == 0, out
    assert out.count("\nbatch ") == 3 and out.rstrip().endswith("done"), out  # 4 + 4 + 2


def static_bytes(program) -> int:
    """data + bss of a program (its static arrays: arena, model, sample buffer)."""
    size = subprocess.run(["size", str(program)], capture_output=True, text=True, check=True)
    text, data, bss = (int(v) for v in size.stdout.splitlines()[1].split()[:3])
    return data + bss


@pytest.mark.skipif(shutil.which("size") is None, reason="needs binutils' size")
def test_the_example_holds_one_sample_whatever_the_batch_size(tmp_path):
    """It read whole batches into a static buffer (batch x input floats): a batch of 512
    MNIST-sized samples was 1.6 MB of RAM on top of the arena."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, 10))
    config = tinyprop.TinyPropConfig("tinypropv2")
    sizes = {}
    for batch_size in (1, 512):
        out = tmp_path / f"b{batch_size}"
        result = export_c(net, config, out, (1, 28, 28), OptimizerSpec("sgd", 0.05), batch_size)
        assert result.sample_bytes == 784 * 4
        made = build(out)
        assert made.returncode == 0, made.stderr
        sizes[batch_size] = static_bytes(out / "train")
    assert sizes[512] == sizes[1]


def hostile_program(tmp_path, memory=None, optimizer=None):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    config = tinyprop.TinyPropConfig("full")
    optimizer = optimizer or OptimizerSpec("sgd", 0.05)
    result = export_c(net, config, tmp_path / "out", (6,), optimizer, 4, memory=memory)
    made = build(result.out_dir, f"CFLAGS=-O1 -g {' '.join(SANITIZE)}")
    assert made.returncode == 0, made.stderr
    return result.out_dir / "train"


@pytest.mark.parametrize(
    ("value", "label", "expected"),
    [
        (None, 4, "record 5 (batch 1): label 4 is outside [0, 4); status -5 (a label is outside"),
        (None, -1, "record 5 (batch 1): label -1 is outside [0, 4); status -5"),
        (None, 2**31 - 1, "record 5 (batch 1): label 2147483647 is outside [0, 4); status -5"),
        (float("nan"), 0, "record 5 (batch 1): value 2 of 6 is NaN or infinite; status -6"),
        (float("inf"), 0, "record 5 (batch 1): value 2 of 6 is NaN or infinite; status -6"),
        (float("-inf"), 0, "record 5 (batch 1): value 2 of 6 is NaN or infinite; status -6"),
    ],
)
def test_hostile_records_stop_the_example_with_the_record_and_status(
    tmp_path, value, label, expected
):
    """A NaN label does not exist in int32; an out-of-range one and a NaN or infinite value
    are named (an infinite value into a ReLU gave a finite loss and NaN weights, status ok)."""
    program = hostile_program(tmp_path)
    generator = np.random.default_rng(0)
    x = generator.standard_normal((8, 6)).astype(np.float32)
    y = np.arange(8) % 4
    y[5] = label
    if value is not None:
        x[5, 2] = value
    run = subprocess.run([str(program)], input=records(x, y), capture_output=True, timeout=60)
    out = run.stdout.decode()
    assert run.returncode == 1, out + run.stderr.decode()
    assert expected in out, out
    assert out.count("\nbatch ") == 1 and "done" not in out, out  # the first batch only
    assert run.stderr == b"", run.stderr.decode()  # no sanitizer report


def test_a_last_short_batch_under_momentum_in_place_is_refused_by_name(tmp_path):
    """momentum in place scales its buffer by the batch size at a batch's first trained
    sample, so a file's shorter last batch cannot be trained as the library would."""
    from tinyprop.memory import MemoryMode

    program = hostile_program(
        tmp_path, MemoryMode(0, momentum_in_place=True), OptimizerSpec("sgd", 0.05, 0.9)
    )
    generator = np.random.default_rng(0)
    x = generator.standard_normal((6, 6)).astype(np.float32)
    run = subprocess.run([str(program)], input=records(x, np.arange(6) % 4), capture_output=True)
    out = run.stdout.decode()
    assert run.returncode == 1, out
    assert "ends inside batch 1 after 2 of its 4 samples" in out and "status -8" in out, out
    whole = subprocess.run([str(program)], input=records(x[:4], np.arange(4) % 4),
                           capture_output=True)  # fmt: skip
    assert whole.returncode == 0 and whole.stdout.decode().rstrip().endswith("done")


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        # a weight that is not finite (a header edited by hand or by a tool): tp_init refuses it;
        # the example printed 'tp_init: <text>' without the status code
        (
            lambda h, a: h.replace("= {\n    ", '= {\n    __builtin_nanf(""), ', 1),
            "tp_init: status -6 (a loss, input, gradient, weight or logit is NaN or infinite; "
            "nothing changed)",
        ),
        # an arena smaller than the model needs: tp_init's own status, with its code
        (
            lambda h, a: h.replace(f"ARENA_BYTES {a}\n", f"ARENA_BYTES {a - 4}\n"),
            "tp_init: status -4 (the arena is too small or not 4-byte aligned)",
        ),
        # larger: tp_init accepts it, the example names both figures
        (
            lambda h, a: h.replace(f"ARENA_BYTES {a}\n", f"ARENA_BYTES {a + 4}\n"),
            "arena: the model needs {arena} bytes, the header says {larger}",
        ),
    ],
    ids=["nan-weight", "small-arena", "large-arena"],
)
def test_a_header_the_runtime_refuses_stops_with_the_status_code(tmp_path, edit, expected):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
    config = tinyprop.TinyPropConfig("tinypropv2")
    result = export_c(net, config, tmp_path, (5,), OptimizerSpec("sgd", 0.05), 4)
    arena = result.arena_bytes
    header = tmp_path / "tinyprop_model.h"
    edited = edit(header.read_text(), arena)
    assert edited != header.read_text()
    header.write_text(edited)
    made = build(tmp_path, "CFLAGS=-O1 -g " + " ".join(SANITIZE))
    assert made.returncode == 0, made.stdout + made.stderr
    run = subprocess.run([str(tmp_path / "train")], input=b"", capture_output=True)
    out = run.stdout.decode()
    line = expected.format(arena=arena, larger=arena + 4)
    assert run.returncode == 1 and out.strip().splitlines() == [line], out + run.stderr.decode()


@pytest.mark.parametrize("program_layers", [None, 60], ids=["exported", "larger"])
def test_a_runtime_built_with_another_layer_limit_is_refused_by_tp_init(tmp_path, program_layers):
    """The runtime built as a library of its own with the default TP_MAX_LAYERS (a PlatformIO
    library, the user's Makefile) and main.c with the exported -DTP_MAX_LAYERS = 3 (or 60):
    their tp_model differ. tp_init's memset of the runtime's struct wrote past the program's
    (an AddressSanitizer report; without it the arena beside it was overwritten)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
    result = export_c(net, tinyprop.TinyPropConfig("tinypropv2"), tmp_path / "out", (5,),
                      OptimizerSpec("sgd", 0.05), 4)  # fmt: skip
    out = result.out_dir
    flags = ["gcc", "-std=c99", "-O0", *SANITIZE, "-I", str(out / "runtime" / "include")]
    objects = []
    for source in sorted((out / "runtime" / "src").glob("*.c")):  # the runtime's default
        objects.append(str(tmp_path / f"{source.stem}.o"))
        subprocess.run([*flags, "-c", str(source), "-o", objects[-1]], check=True)
    layers = program_layers or len(result.layers)
    program = tmp_path / "train"
    subprocess.run([*flags, f"-DTP_MAX_LAYERS={layers}", "-I", str(out), str(out / "main.c"),
                    *objects, "-lm", "-o", str(program)], check=True)  # fmt: skip
    data = records(np.ones((4, 5)), np.arange(4) % 3)
    run = subprocess.run([str(program)], input=data, capture_output=True, timeout=60)
    assert run.returncode == 1 and run.stderr == b"", run.stdout.decode() + run.stderr.decode()
    assert run.stdout.decode().strip() == (
        "tp_init: status -9 (the program was compiled with another TP_MAX_LAYERS than the "
        "runtime (their tp_model differ): build both with the same -DTP_MAX_LAYERS)"
    )
