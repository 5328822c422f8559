"""The report on hand-made records: aggregation over seeds, choice by validation, files, plots."""

from __future__ import annotations

import csv
import statistics

import pytest

from tinyprop.bench import report, store


def make_record(policy, settings, seed, metric, val, backward, compute=0.5, skip=0.0, **extra):
    record = {
        "dataset": "mnist", "source": "mnist", "model": "mlp-128-64", "policy": policy,
        "settings": settings, "protocol": "finetune", "seed": seed, "metric_name": "accuracy",
        "metric": metric, "val_metric": val, "compute_ratio": compute,
        "backward_ratio": backward, "skip_rate": skip, "wall_s": 1.0, "commit": "abc1234",
    }  # fmt: skip
    record.update(extra)
    return record


RECORDS = [
    make_record("full", {}, 0, 97.0, 96.0, 1.0, 1.0),
    make_record("full", {}, 1, 96.0, 95.0, 1.0, 1.0),
    # topk: ratio 0.1 has the better validation but the worse test metric: it must be chosen
    make_record("topk", {"ratio": 0.1}, 0, 90.0, 95.0, 0.15),
    make_record("topk", {"ratio": 0.1}, 1, 92.0, 95.0, 0.15),
    make_record("topk", {"ratio": 0.2}, 0, 96.0, 90.0, 0.25),
    make_record("topk", {"ratio": 0.2}, 1, 96.0, 90.0, 0.25),
    make_record(
        "tinypropv2", {"skip_threshold": 0.5}, 0, 96.5, 94.0, 0.12, 0.4, 0.6, pretrained_metric=90.0
    ),
    make_record(
        "tinypropv2",
        {"skip_threshold": 0.5},
        1,
        95.5,
        94.0,
        0.14,
        0.42,
        0.5,
        pretrained_metric=91.0,
    ),
    make_record("full", {}, 0, 80.0, 81.0, 1.0, 1.0, dataset="har", source="basicmotions"),
]


def write(folder, records):
    for index, record in enumerate(records):
        store.write_record(folder / f"run{index:03d}.json", record)


def chosen(summaries, dataset="mnist"):
    return {s.policy: s for s in summaries if s.chosen and s.dataset == dataset}


def test_summary_means_spreads_and_choice_by_validation():
    rows = chosen(report.summarise(RECORDS))
    assert rows["full"].metric_mean == pytest.approx(96.5)
    assert rows["full"].metric_std == pytest.approx(statistics.stdev([97.0, 96.0]))
    assert rows["topk"].setting == "ratio=0.1"  # by validation, although ratio=0.2 tests better
    assert rows["topk"].metric_mean == pytest.approx(91.0)
    assert rows["topk"].drop_pp == pytest.approx(5.5)
    assert rows["topk"].backward_pct == pytest.approx(15.0)
    v2 = rows["tinypropv2"]
    assert v2.drop_pp == pytest.approx(0.5)
    assert v2.backward_pct == pytest.approx(13.0)
    assert v2.compute_pct == pytest.approx(41.0)
    assert v2.skip_pct == pytest.approx(55.0)
    assert v2.seeds == 2
    assert v2.pretrained_mean == pytest.approx(90.5) and rows["topk"].pretrained_mean is None
    har = chosen(report.summarise(RECORDS), "har")
    assert har["full"].source == "basicmotions" and har["full"].metric_std == 0.0


def test_ties_in_validation_pick_the_cheaper_setting():
    records = [
        make_record("topk", {"ratio": 0.3}, 0, 95.0, 90.0, 0.3),
        make_record("topk", {"ratio": 0.05}, 0, 93.0, 90.0, 0.05),
    ]
    assert chosen(report.summarise(records))["topk"].setting == "ratio=0.05"
    assert chosen(report.summarise(records))["topk"].drop_pp is None  # no full run to compare


def test_cheapest_setting_within_tolerance_of_full_on_validation():
    records = [
        make_record("full", {}, 0, 95.0, 94.0, 1.0, 1.0),
        make_record("tinypropv2", {"skip_threshold": 0.1}, 0, 94.8, 93.9, 0.40),
        make_record("tinypropv2", {"skip_threshold": 0.3}, 0, 94.0, 93.2, 0.20),
        make_record("tinypropv2", {"skip_threshold": 0.5}, 0, 99.0, 92.0, 0.10),  # test ignored
    ]
    assert chosen(report.summarise(records))["tinypropv2"].setting == "skip_threshold=0.3"
    assert chosen(report.summarise(records, tolerance=0.5))["tinypropv2"].setting == (
        "skip_threshold=0.1"
    )
    assert chosen(report.summarise(records, tolerance=-1))["tinypropv2"].setting == (
        "skip_threshold=0.1"
    )
    assert chosen(report.summarise(records, tolerance=5))["tinypropv2"].setting == (
        "skip_threshold=0.5"
    )


def test_reconstruction_error_tolerance_is_relative():
    records = [
        make_record("full", {}, 0, 80.0, -2.0, 1.0, 1.0, val_metric_name="neg_mse"),
        make_record("topk", {"ratio": 0.1}, 0, 70.0, -2.01, 0.1, val_metric_name="neg_mse"),
        make_record("topk", {"ratio": 0.05}, 0, 75.0, -2.5, 0.05, val_metric_name="neg_mse"),
    ]
    assert chosen(report.summarise(records))["topk"].setting == "ratio=0.1"  # within 1% of 2.0


def test_report_files_table_and_plots(tmp_path, capsys):
    write(tmp_path, RECORDS)
    (tmp_path / "notes.json").write_text("[1, 2]")  # not a record: skipped, named on stderr
    assert report.main([str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert f"skipping {tmp_path / 'notes.json'}: holds a JSON list" in captured.err
    printed = captured.out
    text = (tmp_path / "report.md").read_text()
    assert printed.strip() == text.strip()
    assert "| mnist | mnist | tinypropv2 | skip_threshold=0.5 | 2 | accuracy 96.00 ± 0.71 |" in text
    assert "| +0.50 | 41.0 | 13.0 | 55.0 | 90.50 |" in text
    assert "mnist: meets the target" in text
    assert "| har | basicmotions | full |" in text
    with open(tmp_path / "report.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4  # mnist full, topk, tinypropv2; har full
    assert {row["source"] for row in rows} == {"mnist", "basicmotions"}
    topk = next(row for row in rows if row["policy"] == "topk")
    assert float(topk["drop_pp"]) == pytest.approx(5.5) and topk["setting"] == "ratio=0.1"
    with open(tmp_path / "report_settings.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 5  # every setting
    for name in ("plot_finetune_mnist.png", "plot_finetune_har.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_or_empty_results_are_clear_errors(tmp_path, capsys):
    assert report.main([str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert report.main([str(tmp_path)]) == 2
    assert "no run records" in capsys.readouterr().err
    (tmp_path / "run.json").write_text("{}")  # a record given instead of its folder
    assert report.main([str(tmp_path / "run.json")]) == 2
    assert "is a file, not a results folder" in capsys.readouterr().err  # was: does not exist


def test_equal_compute_comparison_counts_matched_settings():
    records = [
        make_record("full", {}, 0, 95.0, 94.0, 1.0, 1.0),
        make_record("topk", {"ratio": 0.1}, 0, 90.0, 90.0, 0.10),
        make_record("topk", {"ratio": 0.3}, 0, 94.0, 93.0, 0.30),
        make_record("tinypropv2", {"skip_threshold": 0.5}, 0, 91.0, 90.0, 0.08),
        make_record("tinypropv2", {"skip_threshold": 0.1}, 0, 93.0, 92.0, 0.25),
    ]
    summaries = report.summarise(records)
    # topk 0.1 (90.0 at 10%) is beaten by v2 0.5 (91.0 at 8%); topk 0.3 (94.0 at 30%) by none
    assert report.equal_compute_lines(summaries) == ["- mnist: topk 1/2"]
    assert "- mnist: topk 1/2" in report.markdown(summaries)


def test_misses_say_why_from_the_numbers():
    records = [
        make_record("full", {}, 0, 95.0, 94.0, 1.0, 1.0, val_samples=300),
        # chosen on validation (0.5 pp) but 3 pp below full on test
        make_record("tinypropv2", {"skip_threshold": 0.5}, 0, 92.0, 93.5, 0.10, val_samples=300),
        make_record("tinypropv2", {"skip_threshold": 0.1}, 0, 95.0, 93.0, 0.30, val_samples=300),
    ]
    text = report.markdown(report.summarise(records))
    assert "mnist: misses the target (drop +3.00 pp, backward 10.0% of full" in text
    assert (
        "validation put the chosen setting +0.50 pp from full (tolerance 1, 300 validation samples"
        in text
    )
    cheap_too_far = [r for r in records if r["settings"] != {"skip_threshold": 0.5}] + [
        make_record("tinypropv2", {"skip_threshold": 0.7}, 0, 93.0, 91.0, 0.15)
    ]
    summaries = report.summarise(cheap_too_far)
    assert chosen(summaries)["tinypropv2"].val_drop == pytest.approx(1.0)
    assert (
        "every setting at <= 20% backward was more than the tolerance below full on validation "
        "(closest: skip_threshold=0.7 at 15.0% backward, validation +3.00 pp, test +2.00 pp)"
    ) in report.markdown(summaries)


def test_a_miss_on_both_counts_gives_both_reasons():
    records = [
        make_record("full", {}, 0, 95.0, 94.0, 1.0, 1.0, val_samples=4),
        make_record("tinypropv2", {"skip_threshold": 0.1}, 0, 93.0, 94.0, 0.30, val_samples=4),
    ]
    text = report.markdown(report.summarise(records))
    assert (
        "misses the target (drop +2.00 pp, backward 30.0% of full, total 50.0%): no setting of "
        "the grid runs at <= 20% backward; validation put the chosen setting +0.00 pp from full "
        "(tolerance 1, 4 validation samples per seed), the test split +2.00 pp"
    ) in text
