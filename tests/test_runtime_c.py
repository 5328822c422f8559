"""The C runtime's own unit tests (runtime/tests/test_runtime.c), built with the system gcc
plainly and with -fsanitize=address,undefined: argument checks, exact arena sizes (every arena
is malloc'ed with exactly tp_arena_bytes, so ASan catches any write beyond it), the k formula,
top-k selection, the skip decision and gradients against finite differences."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tinyprop.export.runtime import runtime_dir

WARNINGS = ["-std=c99", "-Wall", "-Wextra", "-Wpedantic", "-Wshadow", "-Wconversion",
            "-Wno-sign-conversion", "-Werror"]  # fmt: skip
# float-cast-overflow (undefined behaviour) is not part of -fsanitize=undefined
SANITIZE = [
    "-fsanitize=address,undefined,float-cast-overflow",
    "-fno-sanitize-recover=all",
    "-fno-omit-frame-pointer",
]


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


def build_and_run_size_checks(tmp_path, compiler: list[str], runner: list[str]) -> str:
    """runtime/tests/test_sizes.c built with ``compiler`` and run with ``runner``: its output."""
    root = runtime_dir()
    program = tmp_path / "test_sizes"
    sources = [str(root / "tests" / "test_sizes.c")]
    sources += [str(path) for path in sorted((root / "src").glob("*.c"))]
    build = subprocess.run([*compiler, "-I", str(root / "include"), *sources, "-lm", "-o",
                            str(program)], capture_output=True, text=True)  # fmt: skip
    assert build.returncode == 0, build.stderr
    run = subprocess.run([*runner, str(program)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip() == "sizes ok 11 of 11", run.stdout
    return run.stdout


def test_hostile_sizes_are_refused_on_the_host(tmp_path):
    """Shapes whose element counts, dilated kernels or arena overflow 32-bit arithmetic (an
    input of 65536 x 65536, 51 GB of Adam state) get TP_ERR_SHAPE (ASan and UBSan on)."""
    build_and_run_size_checks(tmp_path, ["gcc", *WARNINGS, "-O1", "-g", *SANITIZE], [])


@pytest.mark.skipif(
    shutil.which("arm-none-eabi-gcc") is None or shutil.which("qemu-system-arm") is None,
    reason="needs arm-none-eabi-gcc and qemu-system-arm",
)
def test_hostile_sizes_are_refused_on_a_32_bit_cortex_m4(tmp_path):
    """The same checks where long and size_t have 32 bits: a spec claiming 2^32 input elements
    used to wrap to 0 there and pass, and the arena was sized for far less than it holds."""
    root = runtime_dir() / "examples" / "cortex_m4"
    compiler = ["arm-none-eabi-gcc", "-std=c99", "-O2", "-mcpu=cortex-m4", "-mthumb",
                "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16", "--specs=rdimon.specs",
                str(root / "startup.c"), "-T", str(root / "an386.ld")]  # fmt: skip
    runner = ["qemu-system-arm", "-machine", "mps2-an386", "-nographic", "-semihosting",
              "-kernel"]  # fmt: skip
    build_and_run_size_checks(tmp_path, compiler, runner)


@pytest.mark.skipif(
    shutil.which("arm-none-eabi-gcc") is None or shutil.which("qemu-system-arm") is None,
    reason="needs arm-none-eabi-gcc and qemu-system-arm",
)
def test_c_unit_tests_on_a_cortex_m4(tmp_path):
    """The same unit tests (hostile values, activations, memory modes, gradients) built for a
    Cortex-M4 with its FPU and run under QEMU (mps2-an386): newlib's libm, 32-bit size_t."""
    root = runtime_dir()
    board = root / "examples" / "cortex_m4"
    program = tmp_path / "test_runtime.elf"
    build = subprocess.run(
        ["arm-none-eabi-gcc", "-std=c99", "-O2", "-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard",
         "-mfpu=fpv4-sp-d16", "--specs=rdimon.specs", str(board / "startup.c"), "-T",
         str(board / "an386.ld"), "-I", str(root / "include"), "-I", str(root / "src"),
         str(root / "tests" / "test_runtime.c"), *map(str, sorted((root / "src").glob("*.c"))),
         "-lm", "-o", str(program)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    run = subprocess.run(
        ["qemu-system-arm", "-machine", "mps2-an386", "-nographic", "-semihosting", "-kernel",
         str(program)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip().endswith("0 failures"), run.stdout
    assert int(run.stdout.split()[0]) > 500


@pytest.mark.parametrize("flag", ["-ffast-math", "-Ofast", "-ffinite-math-only"])
def test_a_build_without_nan_checks_is_refused_by_name(tmp_path, flag):
    """-ffast-math lets the compiler drop every isfinite(): a NaN input record was trained
    into the weights with status ok. The runtime now stops the build; -fno-finite-math-only
    after it keeps the other fast-math settings and the checks."""
    root = runtime_dir()
    command = ["gcc", "-std=c99", "-O2", flag, "-fsyntax-only", "-I", str(root / "include"),
               str(root / "src" / "train.c")]  # fmt: skip
    refused = subprocess.run(command, capture_output=True, text=True)
    assert refused.returncode != 0
    assert "build it without -ffast-math / -Ofast, or add -fno-finite-math-only" in refused.stderr
    kept = subprocess.run([*command, "-fno-finite-math-only"], capture_output=True, text=True)
    assert kept.returncode == 0, kept.stderr
