"""Finding 5 of the fail-safe issue: results lost or never redone. A truncated or empty record
counted as done on resume and report left it out silently; one binary record aborted the
report; an unwritable results folder was found only after every run had trained; two bench
processes on one folder each ran every run."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch

from tinyprop import train
from tinyprop.bench import claims, protocols, report, runner, store, suites

TINY = ["--suite", "tiny", "--protocol", "scratch", "--datasets", "tiny-blobs"]
DAMAGE = {"truncated": b'{"dataset": "tiny-blobs", "pol', "empty": b"", "binary": os.urandom(300)}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYPROP_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def counted(monkeypatch):
    """The titles of the runs executed (a stand-in run writing a valid record)."""
    calls = []

    def execute(spec, pretrained=None, write=True):
        calls.append(spec.title)
        record = {key: 0.5 for key in store.NUMBER_KEYS} | {key: "x" for key in store.TEXT_KEYS}
        record |= {"settings": spec.settings, "seed": spec.seed, "metric_name": "accuracy"}
        store.write_record(spec.path, record)
        return record

    monkeypatch.setattr(runner, "execute_run", execute)
    return calls


def test_damaged_records_are_run_again_with_a_line_saying_so(tmp_path, counted, capsys):
    results = tmp_path / "results"
    argv = TINY + ["--results", str(results)]
    assert runner.main(argv) == 0 and len(counted) == 7
    paths = sorted(results.glob("*.json"))
    for path, content in zip(paths, DAMAGE.values(), strict=False):
        path.write_bytes(content)
    incomplete = paths[3]
    incomplete.write_text('{"dataset": "tiny-blobs"}')
    counted.clear()
    capsys.readouterr()
    assert runner.main(argv) == 0
    assert len(counted) == 4  # the three damaged ones and the incomplete one, nothing else
    out = capsys.readouterr().out
    for path in paths[:4]:
        assert f"record {path}:" in out and "again" in out
    assert "incomplete record: missing" in out and "unreadable" in out
    assert all(store.load_record(path)[0] is not None for path in paths)


def test_report_skips_and_names_bad_records(tmp_path, capsys):
    from test_report import RECORDS, write

    write(tmp_path, RECORDS)
    for name, content in DAMAGE.items():
        (tmp_path / f"{name}.json").write_bytes(content)
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "types.json").write_text(
        '{"dataset": 1, ' + ", ".join(f'"{key}": "x"' for key in store.REQUIRED_KEYS[1:]) + "}"
    )
    assert report.main([str(tmp_path), "--no-plots"]) == 0
    err = capsys.readouterr().err
    for name in [*DAMAGE, "list", "types"]:
        assert f"skipping {tmp_path / name}.json" in err
    assert "| mnist |" in (tmp_path / "report.md").read_text()


def test_report_skips_hostile_records(tmp_path, capsys):
    """A symlink to /dev/zero was read until memory ran out, and deeply nested JSON raised
    RecursionError with a traceback; both are skipped, as is a file too large for a record."""
    from test_report import RECORDS, write

    write(tmp_path, RECORDS)
    (tmp_path / "zero.json").symlink_to("/dev/zero")
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with open(tmp_path / "huge.json", "wb") as file:
        file.truncate(store.MAX_RECORD_BYTES + 1)  # sparse: no disk used
    assert report.main([str(tmp_path), "--no-plots"]) == 0
    err = capsys.readouterr().err
    assert f"skipping {tmp_path / 'zero.json'}: not a regular file" in err
    assert f"skipping {tmp_path / 'deep.json'}: unreadable (RecursionError" in err
    assert f"skipping {tmp_path / 'huge.json'}: too large" in err
    assert "| mnist |" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize(
    "change, problem",
    [  # before: a traceback, one line naming no file, or reported as it was
        ({"settings_label": 5}, "wrong types for settings_label"),  # AttributeError traceback
        ({"pretrained_metric": "x"}, "wrong types for pretrained_metric"),  # exit 2, no file
        ({"val_metric_name": 3}, "wrong types for val_metric_name"),
        ({"metric": -5.0}, "impossible values: metric -5.0 (outside [0, 100])"),
        ({"metric": 1e308}, "impossible values: metric 1e+308"),
        ({"skip_rate": 2.0}, "impossible values: skip_rate 2.0 (outside [0, 1])"),
        ({"backward_ratio": -0.1}, "impossible values: backward_ratio -0.1"),
        ({"val_metric_name": "neg_mse", "val_metric": 0.5}, "impossible values: val_metric 0.5"),
    ],
)
def test_report_skips_a_record_of_wrong_types_or_impossible_values(
    tmp_path, capsys, change, problem
):
    from test_report import RECORDS, make_record, write

    write(tmp_path, RECORDS)
    edited = make_record("topk", {}, 0, 50.0, 50.0, 0.2) | change
    store.write_record(tmp_path / "edited.json", edited)
    assert report.main([str(tmp_path), "--no-plots"]) == 0
    assert f"skipping {tmp_path / 'edited.json'}: {problem}" in capsys.readouterr().err
    assert "| mnist |" in (tmp_path / "report.md").read_text()


def _unwritable(tmp_path):
    """A results path nobody can write to, even root: below a regular file."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    return blocker / "results"


def test_unwritable_results_fail_before_any_run(tmp_path, counted, capsys):
    start = time.perf_counter()
    assert runner.main(TINY + ["--results", str(_unwritable(tmp_path))]) == 2
    assert time.perf_counter() - start < 5 and counted == []
    assert "is a file; choose a folder" in capsys.readouterr().err


@pytest.mark.skipif(os.getuid() == 0, reason="root writes to read-only folders")
def test_read_only_results_fail_before_any_run(tmp_path, counted, capsys):
    results = tmp_path / "results"
    results.mkdir(mode=0o500)
    assert runner.main(TINY + ["--results", str(results)]) == 2 and counted == []


@pytest.mark.parametrize("where", ["unwritable", "folder"])
def test_train_record_path_is_checked_before_training(tmp_path, counted, capsys, where):
    record = _unwritable(tmp_path) / "run.json" if where == "unwritable" else tmp_path
    start = time.perf_counter()
    argv = ["--dataset", "tiny-blobs", "--suite", "tiny", "--record", str(record)]
    assert train.main(argv) == 2
    assert time.perf_counter() - start < 5 and counted == []
    assert "tinyprop train:" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--record", "--save"])
def test_train_refuses_to_replace_a_file_that_is_not_regular(tmp_path, counted, capsys, flag):
    """``--record /dev/full`` or ``--save /dev/null``: the file was written next to it and
    renamed over it, which replaced the device node itself with a regular file when run as
    root (``--save`` of a folder was an IsADirectoryError traceback after training). Here a
    FIFO stands for the device: refused before training, and it stays a FIFO."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    argv = ["--dataset", "tiny-blobs", "--suite", "tiny", flag, str(fifo)]
    assert train.main(argv) == 2 and counted == []
    assert "is not a regular file" in capsys.readouterr().err
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert train.main(["--dataset", "tiny-blobs", "--suite", "tiny", flag, str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_records_and_weights_written_through_a_symlink_keep_the_link(tmp_path):
    """A record or state_dict path that is a symlink gets its target written; the rename
    replaced the link with a file before, leaving the target stale."""
    (tmp_path / "real").mkdir()
    for name, write in (
        ("run.json", lambda path: store.write_record(path, {"metric": 1.0})),
        ("model.pt", lambda path: protocols.save_state({"w": torch.ones(2)}, path)),
    ):
        link = tmp_path / name
        link.symlink_to(tmp_path / "real" / name)
        write(link)
        assert link.is_symlink() and (tmp_path / "real" / name).is_file()
    assert json.loads((tmp_path / "real" / "run.json").read_text()) == {"metric": 1.0}
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="not a regular file"):
        store.write_record(fifo, {"metric": 1.0})
    with pytest.raises(OSError, match="not a regular file"):
        protocols.save_state({"w": torch.ones(2)}, fifo)


def test_two_bench_processes_run_each_run_once(tmp_path):
    """Two real ``tinyprop bench`` processes on one results folder, started together."""
    results = tmp_path / "results"
    command = [sys.executable, "-m", "tinyprop.cli", "bench", *TINY, "--results", str(results)]
    processes = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=600)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    finished = [int(line.split()[0]) for out in outputs for line in out.splitlines()
                if " runs finished in " in line]  # fmt: skip
    assert sum(finished) == 7, outputs  # each of the 7 runs ran in exactly one process
    assert len(list(results.glob("*.json"))) == 7
    assert not list(results.glob(".*.claim"))  # every claim released


def _claim(record, holder: str, age_s: float):
    path = claims.claim_path(record)
    path.write_text(holder)
    os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


def test_stale_claims_are_taken_over_and_live_ones_named(tmp_path):
    """A run whose claim was left by a killed bench process was never run again, silently
    ('another process is running it', exit 0): a claim file left empty (killed between
    creating and writing it), or whose process id a later process now holds. Those are taken
    over; a claim that may be live (another host) names its holder and the file to delete."""
    record = tmp_path / "run.json"
    _claim(record, "", age_s=5)  # its creator is writing it right now
    assert not claims.try_claim(record)
    _claim(record, "", age_s=2 * claims.EMPTY_CLAIM_STALE_S)
    assert claims.try_claim(record)
    claims.release(record)
    later = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        holder = f'{{"host": "{socket.gethostname()}", "pid": {later.pid}}}'
        _claim(record, holder, age_s=0)  # that process made the claim: it is alive
        assert not claims.try_claim(record)
        _claim(record, holder, age_s=3600)  # made before that process started: pid reused
        assert claims.try_claim(record)
        claims.release(record)
    finally:
        later.kill()
        later.wait()
    path = _claim(record, '{"host": "another-machine", "pid": 4242}', age_s=3600)
    assert not claims.try_claim(record)
    note = claims.describe_holder(record)
    assert "process 4242 on host another-machine" in note and f"delete {path}" in note


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_report_skips_a_record_holding_nan_or_infinity(tmp_path, capsys, value):
    """JSON's NaN / Infinity in a record's numbers (a hand-edited record) passed the type
    check, and the report's statistics failed with a traceback ('float' object has no
    attribute 'numerator')."""
    from test_report import RECORDS, write

    write(tmp_path, RECORDS)
    record = json.loads(next(tmp_path.glob("*.json")).read_text())
    bad = json.dumps({**record, "metric": 0.0, "seed": 99}).replace(
        '"metric": 0.0', f'"metric": {value}'
    )
    (tmp_path / "edited.json").write_text(bad)
    assert report.main([str(tmp_path), "--no-plots"]) == 0
    assert f"skipping {tmp_path / 'edited.json'}: wrong types for metric" in capsys.readouterr().err


@pytest.mark.parametrize("change", ["epochs", "train_samples"])
def test_a_results_folder_of_another_configuration_is_refused_before_any_run(
    tmp_path, monkeypatch, capsys, change
):
    """A real record of the tiny suite, then the same command with the suite's plan changed
    (another suite's epochs, or its sample cap, which only the record's plan holds): it was
    counted as done and reported as this configuration's run, silently."""
    results = tmp_path / "results"
    argv = TINY + ["--policies", "full", "--results", str(results)]
    assert runner.main(argv) == 0
    (path,) = results.glob("*.json")
    assert store.load_record(path)[0]["plan"]["epochs"] == 2
    plan = suites.TINY.datasets["tiny-blobs"]
    other = replace(plan, **{change: 3})
    monkeypatch.setitem(suites.TINY.datasets, "tiny-blobs", other)
    executed = []
    monkeypatch.setattr(runner, "execute_run", lambda *args, **kwargs: executed.append(args))
    capsys.readouterr()
    assert runner.main(argv) == 2 and executed == []
    error = capsys.readouterr().err
    assert f"{results} holds 1 records of another configuration" in error
    assert path.name in error and "--results" in error
    assert ("epochs 2 (this run: 3)" if change == "epochs" else "'train_samples': None") in error
