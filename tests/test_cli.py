"""The ``tinyprop`` command itself: usage and exit codes, ``--version``, a missing extra is one
line naming it, a pipe closed early ends quietly."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

import tinyprop
from tinyprop import cli


def test_no_arguments_prints_usage_and_exits_2(capsys):
    assert cli.main([]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("usage: tinyprop") and captured.out == ""


def test_help_and_version(capsys):
    assert cli.main(["--help"]) == 0
    assert "commands:" in capsys.readouterr().out
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"tinyprop {tinyprop.__version__}\n"


@pytest.mark.parametrize(
    ("argv", "module", "extra_hint"),
    [
        (["report", "RESULTS"], "matplotlib", "--no-plots"),
        (["bench", "--suite", "tiny", "--ray", "local", "--results", "RESULTS"], "ray", "--ray"),
    ],
)
def test_a_missing_extra_is_one_line_naming_it(tmp_path, monkeypatch, capsys, argv, module,
                                               extra_hint):  # fmt: skip
    monkeypatch.setitem(sys.modules, module, None)  # as if it were not installed
    argv = [str(tmp_path) if part == "RESULTS" else part for part in argv]
    assert cli.main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error, error
    assert f"{module} is not installed" in error and "pip install -e '.[bench]'" in error
    assert extra_hint in error


def test_a_pipe_closed_early_ends_quietly():
    # the reading end is closed before the command has printed anything (as `| head` does once
    # it has its lines), so its first write meets a closed pipe
    command = [sys.executable, "-m", "tinyprop.cli", "bench", "--suite", "small", "--list"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()
    error = process.stderr.read().decode()
    assert process.wait(timeout=120) == cli.EXIT_BROKEN_PIPE
    assert error == ""


def test_usage_and_demo_help_name_every_policy_the_demo_trains(capsys):
    # the usage line said "full, topk and tinypropv2" while the demo trains TinyProp v1 too
    from tinyprop import demo

    trained = {config.policy for config in demo.POLICIES.values()}
    demo_line = next(line for line in cli.usage().splitlines() if line.split()[:1] == ["demo"])
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    description = capsys.readouterr().out.split("options:")[0]
    for text in (demo_line, description):
        words = set(re.findall(r"[\w-]+", text))
        assert trained <= words, (sorted(trained - words), text)
