"""Suite-wide pytest hooks: tests marked ``ray`` run in a pytest process of their own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

CHILD = "TINYPROP_TESTS_RAY_OUTCOMES"  # in the Ray tests' process: where it writes outcomes
TIMEOUT = 1800  # seconds for all the Ray tests together (about 5 minutes at load 11)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "ray: imports or starts Ray; run in a pytest process of its own, so that Ray's threads "
        "never share the suite's process",
    )


def pytest_collection_modifyitems(session: pytest.Session, items: list) -> None:
    """Outside the Ray process, a test marked ``ray`` reports the outcome it had in that
    process instead of running here. One whole-suite run crashed after every test had passed
    (a segfault in libstdc++ on a thread other than the main one, at the interpreter's
    teardown), Ray's C++ threads outliving ``ray.shutdown()`` the suspect: the suite's own
    process now never imports Ray, and its exit status is pytest's."""
    if os.environ.get(CHILD):
        return
    marked = [item for item in items if item.get_closest_marker("ray")]
    for item in marked:
        item.runtest = RayOutcome(session, [each.nodeid for each in marked], item.nodeid)


class RayOutcome:
    """Runs every ``ray`` test of the session in one child pytest process (at the first of
    them), then reports the one test's outcome from the outcomes the child wrote (JSON)."""

    outcomes: dict | None = None  # node id -> (outcome, message), shared by the session

    def __init__(self, session: pytest.Session, nodeids: list[str], nodeid: str):
        self.session, self.nodeids, self.nodeid = session, nodeids, nodeid

    def __call__(self) -> None:
        if RayOutcome.outcomes is None:
            RayOutcome.outcomes = run_in_a_child(self.session, self.nodeids)
        outcome, message = RayOutcome.outcomes.get(self.nodeid, ("missing", ""))
        if outcome == "skipped":
            pytest.skip(message)
        if outcome != "passed":
            pytest.fail(f"in the Ray tests' own pytest process: {outcome}\n{message}", False)


def run_in_a_child(session: pytest.Session, nodeids: list[str]) -> dict:
    """node id -> (outcome, message) of each test, run by ``python -m pytest`` in a child.
    The outcomes are those the child wrote when its session finished, not its exit status, so
    a crash after that (the teardown above) changes nothing, and a test the child did not
    report fails with the child's output."""
    with tempfile.TemporaryDirectory() as folder:
        outcomes = Path(folder) / "outcomes.json"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *nodeids]
        env = {**os.environ, CHILD: str(outcomes)}
        try:
            run = subprocess.run(
                command, cwd=session.config.rootpath, env=env, capture_output=True, text=True,
                timeout=TIMEOUT,
            )  # fmt: skip
            output = f"exit status {run.returncode}\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
        except subprocess.TimeoutExpired:
            output = f"no result within {TIMEOUT} s"
        found = json.loads(outcomes.read_text()) if outcomes.exists() else {}
    return {nodeid: tuple(found.get(nodeid, ("not run", output))) for nodeid in nodeids}


_REPORTED: dict = {}  # in the child: node id -> [outcome, message]


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not os.environ.get(CHILD):
        return
    if report.when == "call" or report.outcome != "passed":  # setup or teardown may fail
        if report.nodeid in _REPORTED and _REPORTED[report.nodeid][0] != "passed":
            return  # the first problem stands
        message = report.longreprtext if report.outcome != "passed" else ""
        if report.skipped and isinstance(report.longrepr, tuple):
            message = report.longrepr[2]
        _REPORTED[report.nodeid] = [report.outcome, message]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get(CHILD):
        Path(os.environ[CHILD]).write_text(json.dumps(_REPORTED))
