"""Cortex-M4 instructions per sample of the exported examples, two versions of the runtime on
the same export, counted under QEMU.

Each example of ``benchmarks/cortex_m4.py`` (its model, built-in samples and training mode) is
exported once and built twice for the Cortex-M4 (``arm-none-eabi-gcc -O2``, the records' flags),
with the runtime's sources at git revision ``--old`` and as they are in the working tree, and
with ``runtime/examples/cortex_m4/count_instructions.c`` wrapped around ``tp_batch_add``. QEMU
runs each with ``-icount shift=0`` (one nanosecond of its virtual clock per instruction, read
from SysTick: the same count on every run, to within 40 instructions per call). It prints, per
version, the instructions of the ``tp_batch_add`` calls of trained and of skipped samples (the
input check, the step, in the in-place modes the update), per call, the ratio new / old, and
whether both trained to the same weights bit for bit.

Run:
    python benchmarks/m4_instructions.py --old main --models mnist-mlp --modes all-sgd-in-place
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

from cortex_m4 import EXAMPLES, M4_FLAGS, POLICIES, export_example, parameters_from

from tinyprop.export.runtime import runtime_dir
from tinyprop.memory import modes_for

QEMU = ["qemu-system-arm", "-machine", "mps2-an386", "-nographic", "-semihosting", "-icount",
        "shift=0", "-kernel"]  # fmt: skip


def runtime_at(revision: str, work: Path) -> Path:
    """The runtime folder at a git revision, unpacked into ``work``."""
    root = Path(__file__).resolve().parents[1]
    archive = subprocess.run(["git", "-C", str(root), "archive", revision, "runtime"],
                             capture_output=True, check=True).stdout  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(work)], input=archive, check=True)
    return work / "runtime"


def count(out: Path, runtime: Path, layers: int, label: str) -> tuple[dict, str]:
    """Build the export in ``out`` with ``runtime``'s sources and the counting wrapper, run it
    under QEMU; the counts and the program's output."""
    cortex = runtime_dir() / "examples" / "cortex_m4"
    sources = [str(out / "main.c"), *map(str, sorted((runtime / "src").glob("*.c")))]
    elf = out / f"count_{label}.elf"
    subprocess.run(
        ["arm-none-eabi-gcc", "-std=c99", "-O2", "-DTP_EMBEDDED_SAMPLES", "-DTP_PRINT_PARAMETERS",
         f"-DTP_MAX_LAYERS={layers}", "-I", str(runtime / "include"), "-I", str(runtime / "src"),
         "-I", str(out), *M4_FLAGS, "--specs=rdimon.specs", *sources,
         str(cortex / "count_instructions.c"), str(cortex / "startup.c"), "-T",
         str(cortex / "an386.ld"), "-Wl,--wrap=tp_batch_add", "-lm", "-o", str(elf)],
        check=True,
    )  # fmt: skip
    for _ in range(3):  # on a loaded machine QEMU's output now and then comes back cut short
        run = subprocess.run([*QEMU, str(elf)], capture_output=True, text=True, timeout=1800)
        line = next(
            (x.split() for x in run.stdout.splitlines() if x.startswith("instructions")), []
        )
        if run.returncode == 0 and line:
            break
    counts = {"trained": int(line[2]), "trained_calls": int(line[4]), "skipped": int(line[6]),
              "skipped_calls": int(line[8])}  # fmt: skip
    return counts, run.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", default="main", help="git revision of the runtime to compare")
    parser.add_argument("--models", nargs="+", default=list(EXAMPLES), choices=list(EXAMPLES))
    parser.add_argument("--modes", nargs="+", help="device modes (default: every one)")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old = runtime_at(args.old, Path(tmp))
        new = runtime_dir()
        for name in args.models:
            for mode in modes_for(EXAMPLES[name][0]):
                if not mode.on_device or (args.modes and mode.name not in args.modes):
                    continue
                for policy in args.policies:
                    out = Path(tmp) / f"{name}-{mode.name}-{policy}"
                    result, _, _ = export_example(name, mode, out, policy)
                    runs = {label: count(out, runtime, len(result.layers), label)
                            for label, runtime in (("old", old), ("new", new))}  # fmt: skip
                    print(f"{name} {mode.name} {policy}:")
                    for kind in ("trained", "skipped"):
                        calls = runs["new"][0][f"{kind}_calls"]
                        if not calls:
                            continue
                        before, after = (runs[v][0][kind] for v in ("old", "new"))
                        print(f"  {kind} ({calls} calls): {before:,} -> {after:,} instructions, "
                              f"per call {before / calls:,.0f} -> {after / calls:,.0f}, "
                              f"new / old {after / before:.4f}")  # fmt: skip
                    same = (parameters_from(runs["old"][1]).tobytes()
                            == parameters_from(runs["new"][1]).tobytes())  # fmt: skip
                    print(f"  weights bit for bit the same: {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
