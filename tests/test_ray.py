"""``tinyprop bench --ray``: a private local instance whose records equal a local run's except
the timings, one-line errors for bad or silent addresses within the timeout, retries recorded
and records written by the driver only (the retry loop is checked with a stand-in for Ray)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import pytest

from tinyprop.bench import cluster, runner

pytestmark = pytest.mark.ray  # Ray runs in a pytest process of its own (tests/conftest.py)

TIMINGS = {"wall_s", "train_wall_s"}
SWEEP = ["--suite", "tiny", "--protocol", "finetune", "--datasets", "tiny-blobs"]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYPROP_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def _records(folder):
    return {path.name: json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))}


def test_ray_local_records_equal_a_local_run_except_timings(tmp_path):
    pytest.importorskip("ray")
    subset = [*SWEEP, "--policies", "full", "tinypropv2"]
    assert runner.main([*subset, "--results", str(tmp_path / "local")]) == 0
    assert runner.main([*subset, "--results", str(tmp_path / "ray"), "--ray", "local"]) == 0
    local, ray = _records(tmp_path / "local"), _records(tmp_path / "ray")
    assert len(local) == 3 and local.keys() == ray.keys()
    for name, record in local.items():
        other = ray[name]
        assert {k for k in record.keys() | other.keys() if record.get(k) != other.get(k)} <= TIMINGS
        assert other["attempts"] == 1 and other["retried_errors"] == []


def test_an_address_nobody_listens_at_fails_at_once_in_one_line(capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    start = time.perf_counter()
    assert runner.main([*SWEEP, "--ray", f"127.0.0.1:{port}"]) == 2
    assert time.perf_counter() - start < 10
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and f"no Ray cluster answers at 127.0.0.1:{port}" in error


@pytest.mark.parametrize("address", ["nonsense", "host:port", "ray://:123"])
def test_a_malformed_address_is_one_line(address, capsys):
    assert runner.main([*SWEEP, "--ray", address]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "is not an address" in error


def test_a_silent_address_times_out_in_one_line(tmp_path):
    pytest.importorskip("ray")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held = []
    threading.Thread(target=lambda: [held.append(server.accept()) for _ in range(8)],
                     daemon=True).start()  # fmt: skip
    port = server.getsockname()[1]
    command = [sys.executable, "-m", "tinyprop.cli", "bench", *SWEEP, "--results",
               str(tmp_path / "r"), "--ray", f"127.0.0.1:{port}", "--ray-timeout", "4"]  # fmt: skip
    start = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - start
    server.close()
    assert run.returncode == 2, run.stderr
    assert seconds < 30, seconds
    ours = [line for line in run.stderr.splitlines() if line.startswith("tinyprop bench:")]
    assert len(ours) == 1 and "within 4 s" in ours[0], run.stderr
    assert not list(tmp_path.glob("r/*.json"))  # no record written


class FakeRay:
    """Just enough of Ray to drive :func:`cluster.run_ray` in this process: tasks run when
    their result is asked for, in submission order."""

    def __init__(self):
        self.initialised = True

    def is_initialized(self):
        return self.initialised

    def shutdown(self):
        self.initialised = False

    def remote(self, **options):
        assert options["max_retries"] == 0  # retries are counted by the driver, not hidden
        fake = self

        class Task:
            def __init__(self, function):
                self.function = function

            def remote(self, *args):
                return Reference(fake, self.function, args)

        return Task

    def wait(self, references, num_returns=1, timeout=None):
        return references[:num_returns], references[num_returns:]

    def get(self, reference):
        return reference.value()


class Reference:
    def __init__(self, fake, function, args):
        self.function, self.args, self.done, self.result, self.error = function, args, False, 0, 0

    def value(self):
        if not self.done:
            self.done = True
            args = [a.value() if isinstance(a, Reference) else a for a in self.args]
            try:
                self.result = self.function(*args)
            except Exception as error:  # as ray.get raises a task's error
                self.error = error
        if self.error:
            raise self.error
        return self.result


def test_retries_are_recorded_and_only_the_driver_writes(tmp_path, monkeypatch):
    fake = FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    suite = runner.suites.get("tiny")
    runs = runner.plan_runs(suite, "scratch", str(tmp_path / "r"), ["tiny-blobs"],
                            ["full", "topk"])  # fmt: skip
    calls, execute = [], runner.execute_run

    def flaky(spec, pretrained=None, write=True):
        calls.append((spec.policy, write))
        if spec.policy == "full" and calls.count(("full", False)) == 1:
            raise RuntimeError("worker lost\nOutOfMemoryError: node died")
        if spec.policy == "topk":
            raise ValueError("always broken")
        return execute(spec, pretrained, write)

    monkeypatch.setattr(runner, "execute_run", flaky)
    failures = cluster.run_ray(runs, "local", retries=1)
    assert failures == [runs[1].title]
    assert all(write is False for _, write in calls)  # tasks never write records
    assert calls.count(("full", False)) == 2 and calls.count(("topk", False)) == 2
    records = _records(tmp_path / "r")
    assert list(records) == [runs[0].path.name]  # the failed run has no record
    (record,) = records.values()
    assert record["attempts"] == 2
    assert record["retried_errors"] == ["OutOfMemoryError: node died"]
    assert fake.initialised  # Ray was running before: left running
