"""The C example: runtime/examples/train_example.c is what `tinyprop export` copies as main.c,
it builds against an exported model header and trains; the example in tinyprop.h's header
comment compiles as written (with the 7-argument tp_train_batch) and trains under ASan."""

from __future__ import annotations

import re
import subprocess

import numpy as np
import torch
from torch import nn

import tinyprop
from tinyprop.export import export_c
from tinyprop.export.runtime import runtime_dir

WARNINGS = ["-std=c99", "-Wall", "-Wextra", "-Werror"]
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]

HEADER_EXAMPLE_MAIN = """#include <stdio.h>
#include "tinyprop.h"
#define ARENA_FLOATS 4096
static const float weight0[16 * 64], bias0[16], weight1[10 * 16], bias1[10];
int main(void) {
    float x[4 * 64];
    int32_t labels[4] = {0, 1, 2, 3}, batch = 4, i;
    for (i = 0; i < 4 * 64; i++) x[i] = (float)((i * 7) % 13) / 13.0f - 0.5f;
BODY
    printf("bytes %lu trained %ld skipped %ld\\n", (unsigned long)bytes, (long)stats.trained,
           (long)stats.skipped);
    return bytes <= sizeof arena && stats.trained + stats.skipped == batch ? 0 : 1;
}
"""


def header_example() -> str:
    """The indented code block of the comment at the top of tinyprop.h."""
    text = (runtime_dir() / "include" / "tinyprop.h").read_text()
    comment = text[: text.index("*/")]
    lines = [line[7:] for line in comment.splitlines() if line.startswith(" *     ")]
    assert lines, "tinyprop.h lost the example in its header comment"
    return "\n".join("    " + line for line in lines)


def test_header_comment_example_compiles_and_trains(tmp_path):
    body = header_example()
    calls = re.findall(r"tp_train_batch\((.*?)\);", body)
    assert calls and all(len(call.split(",")) == 7 for call in calls), calls
    source = tmp_path / "header_example.c"
    source.write_text(HEADER_EXAMPLE_MAIN.replace("BODY", body))
    root = runtime_dir()
    program = tmp_path / "header_example"
    build = subprocess.run(
        ["gcc", *WARNINGS, "-O1", "-g", *SANITIZE, "-I", str(root / "include"), str(source),
         *map(str, sorted((root / "src").glob("*.c"))), "-lm", "-o", str(program)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(program)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "trained" in run.stdout


def test_exporter_copies_train_example_and_it_builds(tmp_path):
    example = runtime_dir() / "examples" / "train_example.c"
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    result = export_c(net, tinyprop.TinyPropConfig("tinypropv2"), tmp_path / "out", batch_size=2)
    assert (result.out_dir / "main.c").read_bytes() == example.read_bytes()
    program = tmp_path / "train"
    build = subprocess.run(
        ["gcc", *WARNINGS, "-O1", "-I", str(result.out_dir / "runtime/include"),
         "-I", str(result.out_dir), str(example),
         *map(str, sorted((result.out_dir / "runtime/src").glob("*.c"))), "-lm", "-o",
         str(program)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    samples = bytearray()
    generator = np.random.default_rng(0)
    for label in (0, 1, 2, 0, 1):
        samples += generator.standard_normal(12).astype(np.float32).tobytes()
        samples += np.int32(label).tobytes()
    run = subprocess.run([str(program)], input=bytes(samples), capture_output=True, timeout=60)
    out = run.stdout.decode()
    assert run.returncode == 0, out
    assert out.count("\nbatch ") == 3 and out.rstrip().endswith("done"), out
