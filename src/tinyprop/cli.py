"""The ``tinyprop`` command: ``demo``, ``train``, ``bench``, ``report``, ``export``.

Each subcommand lives in its own module with a ``main(argv) -> int`` that parses its own flags.
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "demo": ("tinyprop.demo", "train the MNIST reference model with full, topk and tinypropv2"),
    "train": ("tinyprop.train", "train one dataset's reference model with one policy"),
    "bench": ("tinyprop.bench.runner", "run a benchmark suite (datasets x policies x seeds)"),
    "report": ("tinyprop.bench.report", "tables and plots from a results folder"),
    "export": ("tinyprop.export.cli", "write C sources for the runtime from a model"),
}


def usage() -> str:
    lines = ["usage: tinyprop COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<8} {text}" for name, (_, text) in SUBCOMMANDS.items()]
    lines += ["", "Run 'tinyprop COMMAND --help' for the options of one command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        print(f"tinyprop: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[command][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
