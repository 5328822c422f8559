"""The ``tinyprop`` command: ``demo``, ``train``, ``bench``, ``report``, ``export``.

Each subcommand lives in its own module with a ``main(argv) -> int`` that parses its own flags.
``tinyprop`` alone prints the usage and exits 2; ``tinyprop --version`` prints the version. A
missing optional dependency is one line naming the extra that installs it, and output cut
short by a closed pipe (``tinyprop bench --list | head``) ends quietly.
"""

from __future__ import annotations

import importlib
import os
import sys

import tinyprop
from tinyprop.extras import MissingExtraError

SUBCOMMANDS = {
    "demo": ("tinyprop.demo", "train MNIST's MLP with full, topk (meProp), tinyprop, tinypropv2"),
    "train": ("tinyprop.train", "train one dataset's reference model with one policy"),
    "bench": ("tinyprop.bench.runner", "run a benchmark suite (datasets x policies x seeds)"),
    "report": ("tinyprop.bench.report", "tables and plots from a results folder"),
    "export": ("tinyprop.export.cli", "write C sources for the runtime from a model"),
}

EXIT_BROKEN_PIPE = 141  # what a shell reports for a program ended by SIGPIPE (as `yes | head`)


def usage() -> str:
    lines = ["usage: tinyprop [--version] COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<8} {text}" for name, (_, text) in SUBCOMMANDS.items()]
    lines += ["", "Run 'tinyprop COMMAND --help' for the options of one command."]
    return "\n".join(lines)


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's final flush into the closed pipe
    does not print a second error."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"tinyprop {tinyprop.__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        print(f"tinyprop: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(SUBCOMMANDS[command][0])
        status = int(module.main(rest) or 0)
        sys.stdout.flush()  # a closed pipe shows up here, inside the handler
        return status
    except MissingExtraError as error:
        print(f"tinyprop {command}: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
