"""`tinyprop demo` runs end to end on a slice of real MNIST and prints its table."""

import re

import pytest

from tinyprop import cli


def test_demo_prints_one_row_per_policy(capsys):
    assert cli.main(["demo", "--epochs", "1", "--limit", "640"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(
        r"^\| (full|topk 0\.1 \(meProp\)|tinyprop \(v1\)|tinypropv2) +\|(.*)$", out, re.M
    )
    assert [name for name, _ in rows] == [
        "full",
        "topk 0.1 (meProp)",
        "tinyprop (v1)",
        "tinypropv2",
    ]
    full = [float(v) for v in rows[0][1].split("|")[:4]]
    assert full[1:3] == [100.0, 100.0]  # full training is the 100% reference
    for _, cells in rows[1:]:
        accuracy, total, backward, skipped = (float(v) for v in cells.split("|")[:4])
        assert 0 <= accuracy <= 100 and backward < 100 and total < 100


def test_demo_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit) as error:
        cli.main(["demo", "--epochs", "0"])
    assert error.value.code == 2
    assert "must be an integer in [1, 10000]" in capsys.readouterr().err
