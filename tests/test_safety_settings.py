"""Finding 7 of the fail-safe issue: settings and CLI arguments that make no sense were accepted
(d_min=-5, d_max=1e300, beta=1e308, skip_threshold=1e9, a negative seed; --threads 0 gave a
traceback per run, --lr nan, --epochs 0, --max-settings -1 ... tracebacks or silently nothing).
Every setting now has a checked range, every CLI argument a parser type: one line, exit 2."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import tinyprop
from tinyprop import cli

BAD_SETTINGS = [
    (dict(d_min=-5.0), "0 <= d_min <= d_max"),
    (dict(d_max=1e300), "d_max <= 1e+06"),
    (dict(beta=1e308), "beta must be positive and at most 1e+06"),
    (dict(beta=0.0), "beta must be positive and at most 1e+06"),
    (dict(skip_threshold=1e9), "exceeds the largest decision metric D"),
    (dict(skip_threshold=2.0), "d_max·beta = 1"),
    (dict(skip_threshold=0.6, d_max=0.5), "choose τ <= 0.5"),
    (dict(seed=-1), "seed must lie in"),
    (dict(seed=2**40), "seed must lie in"),
]


@pytest.mark.parametrize("fields, message", BAD_SETTINGS, ids=[str(f) for f, _ in BAD_SETTINGS])
def test_settings_out_of_range_are_refused_at_construction(fields, message):
    with pytest.raises(ValueError, match=message.replace("+", r"\+").replace("(", r"\(")):
        tinyprop.TinyPropConfig(**fields)


def test_settings_at_the_edges_of_their_ranges_are_accepted():
    tinyprop.TinyPropConfig(d_min=0.0, d_max=0.0, skip_threshold=0.0)
    tinyprop.TinyPropConfig(d_max=2.0, beta=1.5, skip_threshold=3.0)  # τ = D_max·β exactly
    tinyprop.TinyPropConfig(d_max=1e6, beta=1e6, seed=2**31 - 1)


def test_numpy_numbers_are_settings_like_python_ones():
    """A sweep over np.linspace(..., dtype=np.float32) or np.arange seeds: np.float32 and
    np.int64 were refused ('ratio must be a number, got np.float32(0.5)'); they now become the
    Python numbers (records and hashes stay plain). A tensor or a NumPy bool stays an error."""
    config = tinyprop.TinyPropConfig(
        policy="topk", ratio=np.float32(0.25), seed=np.int64(3), budget=np.float64(0.5)
    )
    assert (config.ratio, config.seed, config.budget) == (0.25, 3, 0.5)
    assert [type(value) for value in (config.ratio, config.seed, config.budget)] == [
        float,
        int,
        float,
    ]
    assert config == tinyprop.TinyPropConfig(policy="topk", ratio=0.25, seed=3, budget=0.5)
    for bad in (
        dict(ratio=torch.tensor(0.5)),
        dict(ratio=np.bool_(True)),
        dict(seed=np.float32(1)),
    ):
        with pytest.raises(TypeError):
            tinyprop.TinyPropConfig(policy="topk", **bad)


TRAIN = ["train", "--dataset", "tiny-blobs", "--suite", "tiny"]
BENCH = ["bench", "--suite", "tiny", "--results", "/nonexistent-never-written"]
BAD_ARGUMENTS = [
    (TRAIN + ["--threads", "0"], "--threads"),
    (TRAIN + ["--threads", "100000"], "--threads"),
    (TRAIN + ["--batch-size", "0"], "--batch-size"),
    (TRAIN + ["--lr", "nan"], "--lr"),
    (TRAIN + ["--lr", "-1"], "--lr"),
    (TRAIN + ["--epochs", "0"], "--epochs"),
    (TRAIN + ["--epochs", "-1"], "--epochs"),
    (TRAIN + ["--epochs", "1000000000000"], "--epochs"),  # trained until it was killed
    (TRAIN + ["--pretrain-epochs", "1000000000000"], "--pretrain-epochs"),
    (["demo", "--epochs", "100001"], "--epochs"),
    (TRAIN + ["--train-samples", "0"], "--train-samples"),
    (TRAIN + ["--test-samples", "x"], "--test-samples"),
    (TRAIN + ["--seed", "-3"], "--seed"),
    (TRAIN + ["--skip-threshold", "inf"], "--skip-threshold"),
    (TRAIN + ["--pretrain-epochs", "-1"], "--pretrain-epochs"),
    (BENCH + ["--threads", "0"], "--threads"),
    (BENCH + ["--max-settings", "-1"], "--max-settings"),
    (BENCH + ["--max-settings", "0"], "--max-settings"),
    (BENCH + ["--seeds", "0", "-1"], "--seeds"),
    (["demo", "--epochs", "0"], "--epochs"),
    (["demo", "--limit", "0"], "--limit"),
    (["demo", "--seed", "-1"], "--seed"),
    (["report", "somewhere", "--tolerance", "nan"], "--tolerance"),
    (["export", "m.pt", "--out", "o", "--lr", "nan"], "--lr"),
    (["export", "m.pt", "--out", "o", "--momentum", "-0.5"], "--momentum"),
    (["export", "m.pt", "--out", "o", "--weight-decay", "inf"], "--weight-decay"),
    (["export", "m.pt", "--out", "o", "--batch-size", "0"], "--batch-size"),
]


@pytest.mark.parametrize("argv, flag", BAD_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_ARGUMENTS])
def test_bad_cli_arguments_stop_the_parser_with_one_line(argv, flag, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if "error:" in line]
    assert f"argument {flag}" in line


def test_out_of_range_setting_flag_is_one_line_before_training(capsys):
    assert cli.main(TRAIN + ["--skip-threshold", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tinyprop train:") and "exceeds the largest decision metric" in err
    assert len(err.splitlines()) == 1


def test_a_real_process_exits_2_without_traceback():
    command = [sys.executable, "-m", "tinyprop.cli", *TRAIN, "--threads", "0"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "argument --threads: must be an integer in [1, 1024], got '0'" in result.stderr
