"""Worst-case stack of a Cortex-M4 build, read from its machine code: each function's frame
(every push, vpush, ``sub sp`` and pre-decrementing store to sp in its code, summed, so at
least what any one path through it takes) plus the deepest chain of functions it calls
(``bl``, and branches into another function: tail calls), down to the C library's routines
linked in (libm, libgcc's soft double). A call through a pointer or a frame of run-time size
cannot be bounded this way and is reported as such instead of a number.

    python benchmarks/stack_usage.py ELF [FUNCTION ...]     # default: the runtime's API

``tests/test_stack_usage.py`` checks the frames against GCC's own ``-fstack-usage`` figures for
the runtime's functions, and that a run under QEMU (stack painting,
``runtime/examples/cortex_m4/stack_paint.c``) never goes deeper than the bound.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

# The runtime calls a program makes: set up, train, predict.
RUNTIME_ENTRY_POINTS = (
    "tp_arena_bytes_mode",
    "tp_init_mode_checked",  # tp_init_mode in a program (the header's macro)
    "tp_batch_begin",
    "tp_batch_add",
    "tp_batch_end",
    "tp_batch_shorten",
    "tp_train_batch",
    "tp_predict",
)

FUNCTION = re.compile(r"^([0-9a-f]+) <(.+)>:$")
INSTRUCTION = re.compile(r"^\s+[0-9a-f]+:\s+(\S+)\s*(.*)$")
TARGET = re.compile(r"^[0-9a-f]+ <([^>+]+)(\+0x[0-9a-f]+)?>")


class UnboundedStackError(ValueError):
    """The stack below a function cannot be bounded from its code (recursion, a call through a
    pointer, a frame of run-time size)."""


@dataclass
class Function:
    """One function of the image: its own frame in bytes and the functions it calls."""

    name: str
    frame: int = 0
    callees: set[str] = field(default_factory=set)
    unbounded: list[str] = field(default_factory=list)  # instructions that defeat a bound


def register_bytes(registers: str) -> int:
    """Bytes a push / vpush of ``{r4, r5, lr}`` or ``{d8-d15}`` stores."""
    total = 0
    for item in registers.strip("{} ").split(","):
        item = item.strip()
        first, _, last = item.partition("-")
        size = 8 if first.startswith("d") else 4
        count = int(last[1:]) - int(first[1:]) + 1 if last else 1
        total += size * count
    return total


def stack_decrement(mnemonic: str, operands: str) -> int | None:
    """Bytes an instruction moves sp down by (0 if none); None for a run-time amount."""
    operands = operands.split(";")[0].split("@")[0].strip()
    base = mnemonic.split(".")[0]
    if base in ("push", "vpush"):
        return register_bytes(operands)
    if base in ("stmdb", "vstmdb") and operands.startswith("sp!"):
        return register_bytes(operands.split(",", 1)[1])
    if base in ("sub", "subw", "subs") and re.match(r"sp, (sp, )?", operands):
        value = re.search(r"#(\d+)", operands)
        return int(value.group(1)) if value else None
    if base.startswith("str") or base.startswith("vstr"):
        match = re.search(r"\[sp, #-(\d+)\]!", operands)
        return int(match.group(1)) if match else 0
    return 0


def read_functions(elf: Path) -> dict[str, Function]:
    """Every function of ``elf`` with its frame and callees (objdump's disassembly)."""
    text = subprocess.run(
        ["arm-none-eabi-objdump", "-d", "--no-show-raw-insn", str(elf)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    functions: dict[str, Function] = {}
    current: Function | None = None
    for line in text.splitlines():
        header = FUNCTION.match(line)
        if header:
            current = functions.setdefault(header.group(2), Function(header.group(2)))
            continue
        instruction = INSTRUCTION.match(line)
        if current is None or instruction is None:
            continue
        mnemonic, operands = instruction.groups()
        decrement = stack_decrement(mnemonic, operands)
        if decrement is None:
            current.unbounded.append(f"{mnemonic} {operands}")
        else:
            current.frame += decrement
        base = mnemonic.split(".")[0]
        if base in ("bl", "b", "bcc", "bcs", "beq", "bne", "bgt", "bge", "blt", "ble", "bhi",
                    "bls", "bmi", "bpl", "cbz", "cbnz"):  # fmt: skip
            target = TARGET.search(operands.split(",")[-1].strip())
            if target and target.group(1) != current.name:
                current.callees.add(target.group(1))
        elif base.startswith(("blx", "bx")) and re.fullmatch(r"r\d+|ip|sl|fp", operands.strip()):
            current.unbounded.append(f"{mnemonic} {operands} (a call through a pointer)")
        elif base == "blx":
            target = TARGET.search(operands.strip())
            if target:
                current.callees.add(target.group(1))
    return functions


def worst_case(
    functions: dict[str, Function], root: str, strict: bool = True
) -> tuple[int, list[str], list[str]]:
    """The deepest stack below ``root`` (its frame included), the chain that takes it and the
    functions left out of it.

    ``strict``: raise on what cannot be bounded; otherwise a function that calls through a
    pointer (newlib's stdio) counts its own frame and its direct calls, and is listed.

    Raises:
        UnboundedStackError: recursion, or (``strict``) a call through a pointer or a frame of
            run-time size on some path from ``root``.
    """
    memo: dict[str, tuple[int, list[str]]] = {}
    left_out: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> tuple[int, list[str]]:
        if name in path:
            raise UnboundedStackError(f"recursion: {' -> '.join((*path, name))}")
        if name in memo:
            return memo[name]
        function = functions.get(name)
        if function is None:
            raise UnboundedStackError(f"{name} (called from {path[-1]}) is not in the image")
        if function.unbounded:
            if strict:
                raise UnboundedStackError(
                    f"{name} (from {' -> '.join(path) or 'the root'}): {function.unbounded[0]}"
                )
            left_out.add(name)
        deepest, chain = 0, []
        for callee in sorted(function.callees):
            try:
                depth, below = visit(callee, (*path, name))
            except UnboundedStackError:
                if strict:
                    raise
                left_out.add(callee)  # recursion inside the C library's stdio
                continue
            if depth > deepest:
                deepest, chain = depth, below
        memo[name] = (function.frame + deepest, [name, *chain])
        return memo[name]

    depth, chain = visit(root, ())
    return depth, chain, sorted(left_out)


def stack_bounds(elf: Path, roots: tuple[str, ...] = RUNTIME_ENTRY_POINTS) -> dict[str, dict]:
    """Per root function of ``elf``: ``{"bytes": worst-case stack, "chain": [...]}``."""
    functions = read_functions(elf)
    bounds = {}
    for root in roots:
        depth, chain, _ = worst_case(functions, root)
        bounds[root] = {"bytes": depth, "chain": chain}
    return bounds


def program_bound(elf: Path, root: str = "main") -> dict:
    """The worst-case stack below ``root`` with what cannot be bounded (newlib's stdio, which
    calls through pointers) counted by its own frames only; ``left_out`` names it."""
    depth, chain, left_out = worst_case(read_functions(elf), root, strict=False)
    return {"bytes": depth, "chain": chain, "left_out": left_out}


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    elf, roots = Path(argv[0]), tuple(argv[1:]) or RUNTIME_ENTRY_POINTS
    for root, bound in stack_bounds(elf, roots).items():
        print(f"{root:<22} {bound['bytes']:>7,} B  {' -> '.join(bound['chain'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
