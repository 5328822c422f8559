"""Suite-wide pytest hooks."""

from __future__ import annotations

import os
import sys

import pytest

_EXIT_STATUS = {"status": 0}


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _EXIT_STATUS["status"] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """After the summary, a process that ran Ray (tests/test_bench.py's cluster tests) ends
    without Python's teardown, keeping pytest's exit status: Ray's C++ threads can outlive
    ray.shutdown(), and one run of the whole suite crashed in that teardown after every test had
    passed (a segfault in libstdc++ on a thread other than the main one). Nothing is skipped:
    every test and every report has run by now."""
    if "ray" not in sys.modules:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_EXIT_STATUS["status"])
