"""The C runtime's own unit tests (runtime/tests/test_runtime.c), built with the system gcc
plainly and with -fsanitize=address,undefined: argument checks, exact arena sizes (every arena
is malloc'ed with exactly tp_arena_bytes, so ASan catches any write beyond it), the k formula,
top-k selection, the skip decision and gradients against finite differences."""

from __future__ import annotations

import subprocess

import pytest

from tinyprop.export.runtime import runtime_dir

WARNINGS = ["-std=c99", "-Wall", "-Wextra", "-Wpedantic", "-Wshadow", "-Wconversion",
            "-Wno-sign-conversion", "-Werror"]  # fmt: skip
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]


@pytest.mark.parametrize(
    ("sanitize", "flags"),
    [(False, []), (True, []), (True, ["-DTP_SKIP_ZERO_ERRORS=1"])],
    ids=["plain", "asan-ubsan", "asan-ubsan-zero-skip"],
)
def test_c_unit_tests(tmp_path, sanitize, flags):
    root = runtime_dir()
    program = tmp_path / "test_runtime"
    sources = [str(root / "tests" / "test_runtime.c")]
    sources += [str(path) for path in sorted((root / "src").glob("*.c"))]
    command = ["gcc", *WARNINGS, "-O1", "-g", *(SANITIZE if sanitize else []), *flags,
               "-I", str(root / "include"), "-I", str(root / "src"), *sources,
               "-lm", "-o", str(program)]  # fmt: skip
    build = subprocess.run(command, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(program)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip().endswith("0 failures"), run.stdout
    assert int(run.stdout.split()[0]) > 500  # the checks really ran
