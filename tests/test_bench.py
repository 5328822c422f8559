"""The benchmark runner on the test-only tiny suite: records, resume, Ray, protocols, metrics."""

from __future__ import annotations

import json

import pytest
import torch

from tinyprop.bench import metrics, protocols, runner, store, suites, tiny
from tinyprop.bench.training import batches


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYPROP_CACHE", str(tmp_path / "cache"))  # pretrained weights go here


def _records(folder):
    return {path.name: json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))}


def test_local_run_writes_complete_records_and_resumes(tmp_path, monkeypatch):
    results = tmp_path / "results"
    calls = []
    execute = runner.execute_run
    monkeypatch.setattr(runner, "execute_run", lambda *a: calls.append(a[0].title) or execute(*a))
    common = ["--suite", "tiny", "--protocol", "finetune", "--results", str(results)]
    # an "interrupted" sweep: only two policies got done
    assert runner.main(common + ["--policies", "full", "topk"]) == 0
    assert len(calls) == 4  # 2 datasets x 2 policies x 1 setting x 1 seed
    first = _records(results)
    assert runner.main(common) == 0  # the full sweep resumes
    assert len(calls) == 14  # 2 datasets x 7 (policy, setting) pairs: only 10 new ones ran
    records = _records(results)
    assert len(records) == 14
    for name, record in first.items():
        assert records[name] == record  # finished runs were not redone
    for record in records.values():
        assert set(store.REQUIRED_KEYS) <= set(record)
        assert record["protocol"] == "finetune" and record["seed"] == 0
        assert 0 < record["compute_ratio"] <= 1.0 + 1e-9
        assert 0 <= record["backward_ratio"] <= 1.0 + 1e-9
        assert 0 <= record["skip_rate"] <= 1
        assert record["pretrain_samples"] > 0 and record["train_samples"] > 0
        assert record["pretrained_metric"] is not None
        if record["dataset"] == "tiny-anomaly":
            assert record["metric_name"] == "auc" and record["val_metric_name"] == "neg_mse"
        else:
            assert record["metric_name"] == "accuracy" and record["val_metric_name"] == "accuracy"
    by_policy = {(r["dataset"], r["policy"], r["settings_label"]): r for r in records.values()}
    full = by_policy[("tiny-blobs", "full", "default")]
    assert full["compute_ratio"] == pytest.approx(1.0) and full["skip_rate"] == 0
    assert by_policy[("tiny-blobs", "topk", "ratio=0.2")]["backward_ratio"] < 0.6
    # the blobs are easy: a pretrained then fine-tuned MLP must beat chance (25%) by far
    assert full["metric"] > 80
    assert runner.main(common) == 0 and len(calls) == 14  # nothing left to do


def test_all_policies_start_from_the_same_pretrained_weights(tmp_path):
    suite = suites.get("tiny")
    runs = runner.plan_runs(suite, "finetune", str(tmp_path), ["tiny-blobs"], ["full", "topk"])
    first = runner.pretrained_state(runs[0])
    again = runner.pretrained_state(runs[1])  # from the cache file
    assert first.keys() == again.keys()
    assert all(torch.equal(first[name], again[name]) for name in first)
    other_seed = runner.plan_runs(suite, "finetune", str(tmp_path), ["tiny-blobs"], seeds=[1])
    different = runner.pretrained_state(other_seed[0])
    assert not all(torch.equal(first[name], different[name]) for name in first)


@pytest.mark.ray  # in a pytest process of its own (tests/conftest.py)
def test_ray_runs_each_run_as_a_task(tmp_path):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        results = tmp_path / "ray"
        args = ["--suite", "tiny", "--protocol", "finetune", "--results", str(results)]
        args += ["--datasets", "tiny-blobs", "--policies", "full", "tinypropv2"]
        assert runner.main(args + ["--ray", "ignored-when-initialised"]) == 0
        records = _records(results)
        assert len(records) == 3  # full + 2 tinypropv2 settings
        for record in records.values():
            assert set(store.REQUIRED_KEYS) <= set(record)
    finally:
        ray.shutdown()


def test_plan_validates_names_and_settings(tmp_path):
    suite = suites.get("tiny")
    with pytest.raises(ValueError, match="not in suite"):
        runner.plan_runs(suite, "scratch", str(tmp_path), datasets=["imagenet"])
    with pytest.raises(ValueError, match="unknown policy"):
        runner.plan_runs(suite, "scratch", str(tmp_path), policies=["sgd"])
    with pytest.raises(ValueError, match="unknown protocol"):
        runner.plan_runs(suite, "transfer", str(tmp_path))
    assert runner.main(["--suite", "tiny", "--datasets", "imagenet"]) == 2
    runs = runner.plan_runs(suite, "scratch", str(tmp_path), max_settings=1)
    assert len(runs) == 2 * 6  # one setting per policy
    assert len({run.path for run in runs}) == len(runs)


def test_plan_runs_only_the_named_settings(tmp_path):
    suite = suites.get("budget")
    labels = ["budget=0.2,lr=0.01,optimizer=sgd", "lr=0.01,optimizer=sgd"]
    runs = runner.plan_runs(
        suite, "finetune", str(tmp_path), ["digits"], ["full", "tinypropv2"], [0, 1],
        labels=labels,
    )  # fmt: skip
    assert sorted((run.policy, run.settings_label, run.seed) for run in runs) == [
        ("full", labels[1], 0), ("full", labels[1], 1),
        ("tinypropv2", labels[0], 0), ("tinypropv2", labels[0], 1),
    ]  # fmt: skip
    with pytest.raises(ValueError, match="no policy of the run has the setting 'budget=0.4'"):
        runner.plan_runs(suite, "finetune", str(tmp_path), labels=["budget=0.4"])
    argv = ["--suite", "budget", "--datasets", "digits", "--settings", "budget=0.4", "--list"]
    assert runner.main(argv) == 2


def test_every_suite_has_valid_settings_for_all_policies():
    for suite in suites.SUITES.values():
        assert set(suite.settings) == set(suites.POLICIES)
        runs = runner.plan_runs(suite, "scratch", "/nonexistent")  # builds every config
        assert len(runs) == len(suite.datasets) * len(suite.seeds) * sum(
            len(grid) for grid in suite.settings.values()
        )


def test_splits_are_disjoint_and_cover_the_pool():
    for protocol in protocols.PROTOCOLS:
        splits = protocols.split_pool(
            101, protocol, seed=3, val_fraction=0.1, pretrain_fraction=0.5
        )
        every = torch.cat([splits.val, splits.pretrain, splits.train])
        assert sorted(every.tolist()) == list(range(101))
        assert len(splits.val) == 10
    scratch = protocols.split_pool(101, "scratch", 3, 0.1, 0.5)
    assert len(scratch.pretrain) == 0
    again = protocols.split_pool(101, "finetune", 3, 0.1, 0.5)
    assert torch.equal(again.val, scratch.val)  # the validation split is the same in both
    with pytest.raises(ValueError, match="at least 3"):
        protocols.split_pool(2, "finetune", 0, 0.1, 0.5)


def test_batches_cover_every_sample_once_per_epoch():
    seen = [index for _, batch in batches(10, 3, 2, seed=0) for index in batch.tolist()]
    assert sorted(seen) == sorted(list(range(10)) * 2)


def test_auc_matches_pairwise_counting():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (40,), generator=generator).float()  # many ties
    labels = torch.randint(0, 2, (40,), generator=generator)
    positive, negative = scores[labels == 1], scores[labels == 0]
    wins = (positive[:, None] > negative[None, :]).double().sum()
    ties = (positive[:, None] == negative[None, :]).double().sum()
    expected = 100 * (wins + 0.5 * ties).item() / (len(positive) * len(negative))
    assert metrics.auc(scores, labels) == pytest.approx(expected)
    assert metrics.auc(torch.tensor([1.0, 2.0]), torch.tensor([0, 1])) == 100.0
    with pytest.raises(ValueError, match="both present"):
        metrics.auc(torch.tensor([1.0, 2.0]), torch.tensor([0, 0]))


def test_accuracy_counts_argmax_hits():
    logits = torch.tensor([[0.0, 1.0], [2.0, 1.0], [0.0, 3.0]])
    assert metrics.accuracy(logits, torch.tensor([1, 0, 0])) == pytest.approx(200 / 3)


def test_tiny_datasets_are_deterministic():
    first, second = tiny.load("tiny-blobs", "train"), tiny.load("tiny-blobs", "train")
    assert torch.equal(first.x, second.x) and torch.equal(first.y, second.y)
    anomalies = tiny.load("tiny-anomaly", "train")
    assert int(anomalies.y.sum()) == 0  # training data is normal only
    assert set(tiny.load("tiny-anomaly", "test").y.tolist()) == {0, 1}


def test_train_command_prints_metric_and_ledger(tmp_path, capsys):
    from tinyprop import train

    record_path = tmp_path / "run.json"
    args = ["--suite", "tiny", "--dataset", "tiny-blobs", "--policy", "topk", "--ratio", "0.25"]
    assert train.main(args + ["--epochs", "1", "--record", str(record_path)]) == 0
    printed = capsys.readouterr().out
    record = json.loads(record_path.read_text())
    assert record["settings"] == {"ratio": 0.25} and record["epochs"] == 1
    assert f"test accuracy: {record['metric']:.2f}%" in printed
    assert f"backward {100 * record['backward_ratio']:.1f}%" in printed
    assert "ledger (MACs)" in printed
    assert train.main(["--dataset", "imagenet"]) == 2
    assert "unknown dataset" in capsys.readouterr().err
    assert train.main(args + ["--s-min", "0.9", "--s-max", "0.1"]) == 2
    assert "s_min" in capsys.readouterr().err
    unified = tmp_path / "unified.json"
    assert train.main(args + ["--epochs", "1", "--unified", "--record", str(unified)]) == 0
    assert json.loads(unified.read_text())["settings"] == {"ratio": 0.25, "unified": True}
    assert train.main(["--suite", "tiny", "--dataset", "tiny-blobs", "--unified"]) == 0
    assert train.main(args[:4] + ["--policy", "full", "--unified"]) == 2
    assert "unified applies to topk" in capsys.readouterr().err


def test_standardize_last_axis_uses_the_reference_statistics_only():
    from tinyprop.bench.sources import Arrays, standardize_last_axis

    generator = torch.Generator().manual_seed(0)
    train = Arrays(torch.randn(50, 1, 7, 3, generator=generator) * 40 + 5, torch.zeros(50), "s", 2)
    test = Arrays(torch.randn(20, 1, 7, 3, generator=generator) * 40 + 5, torch.zeros(20), "s", 2)
    scaled_train, scaled_test = standardize_last_axis(train.x, train, test)
    per_feature = scaled_train.x.reshape(-1, 3)
    torch.testing.assert_close(per_feature.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(per_feature.std(0), torch.ones(3), atol=1e-5, rtol=0)
    assert not torch.allclose(scaled_test.x.reshape(-1, 3).mean(0), torch.zeros(3), atol=1e-3)
    with pytest.raises(ValueError, match="at least 2 training samples"):
        standardize_last_axis(train.x[:1], train)


def test_train_command_takes_every_dataset_its_help_names(tmp_path, capsys, monkeypatch):
    # fashion_mnist and digits have a plan only in the budget suite: `tinyprop train --dataset
    # digits` (default --suite small) was a KeyError traceback
    from tinyprop import train

    monkeypatch.chdir(tmp_path)
    named = train.dataset_names()
    with pytest.raises(SystemExit):
        train.main(["--help"])
    assert ", ".join(named) in " ".join(capsys.readouterr().out.split())
    assert {"digits", "fashion_mnist", "tiny-blobs"} <= set(named)
    limits = ["--epochs", "1", "--train-samples", "120", "--test-samples", "40"]
    for dataset in ("digits", "tiny-blobs"):  # no plan in the small suite, both offline
        assert train.main(["--dataset", dataset, "--policy", "topk", *limits]) == 0
        assert "test accuracy" in capsys.readouterr().out
    assert train.main(["--dataset", "imagenet"]) == 2
    assert ", ".join(named) in capsys.readouterr().err


def test_pretrain_key_ignores_new_plan_fields_at_their_defaults():
    from tinyprop.bench.protocols import pretrain_key
    from tinyprop.bench.suites import DatasetPlan

    plain = DatasetPlan(100, 50, epochs=2, pretrain_epochs=3)
    same = DatasetPlan(100, 50, epochs=2, pretrain_epochs=3, data_options=(), standardize=None)
    other = DatasetPlan(100, 50, epochs=2, pretrain_epochs=3, data_options=(("resolution", 32),))
    key = pretrain_key("d", "s", "m", plain, seed=0)
    assert key == pretrain_key("d", "s", "m", same, seed=0)
    assert key != pretrain_key("d", "s", "m", other, seed=0)


def test_validation_is_topped_up_from_outside_the_capped_pool():
    from tinyprop.bench import sources

    plan = suites.DatasetPlan(120, None, epochs=1, pretrain_epochs=1)
    spec = runner.RunSpec("t", "tiny-blobs", "full", {}, "finetune", 1, plan, min_val_samples=50)
    pool, _, splits, _, _ = runner.prepare(spec)
    plain, _, plain_splits, _, _ = runner.prepare(
        runner.RunSpec(**{**vars(spec), "min_val_samples": 0})
    )
    assert len(plain_splits.val) == 12 and len(splits.val) == 50
    # the pretraining and training parts (and the pool they index) are unchanged
    assert torch.equal(splits.train, plain_splits.train)
    assert torch.equal(splits.pretrain, plain_splits.pretrain)
    torch.testing.assert_close(pool.x[: len(plain.y)], plain.x)
    # the 38 extra validation samples are training samples outside the pool
    whole = sources.load("tiny-blobs", "train", None).x.reshape(240, -1)
    extra = pool.x[len(plain.y) :].reshape(38, -1)
    inside = plain.x.reshape(120, -1)
    assert all((whole == row).all(1).any() for row in extra)
    assert not any((inside == row).all(1).any() for row in extra)
    # no samples outside the pool: the pool's share only
    whole_plan = suites.DatasetPlan(None, None, epochs=1, pretrain_epochs=1)
    _, _, uncapped, _, _ = runner.prepare(runner.RunSpec(**{**vars(spec), "plan": whole_plan}))
    assert len(uncapped.val) == 24


def test_an_interrupted_sweep_keeps_its_records_and_resumes(tmp_path, monkeypatch, capsys):
    results = tmp_path / "results"
    common = ["--suite", "tiny", "--protocol", "scratch", "--results", str(results)]
    execute, calls = runner.execute_run, []

    def interrupt_at_the_fifth_run(*args):
        calls.append(args[0].title)
        if len(calls) == 5:
            raise KeyboardInterrupt  # Ctrl-C in the middle of a run
        return execute(*args)

    monkeypatch.setattr(runner, "execute_run", interrupt_at_the_fifth_run)
    assert runner.main(common) == 130
    assert "interrupted: 4 of 14 runs finished and kept, 10 left" in capsys.readouterr().err
    first = _records(results)
    assert len(first) == 4
    monkeypatch.setattr(runner, "execute_run", lambda *a: calls.append(a[0].title) or execute(*a))
    assert runner.main(common) == 0
    assert "14 runs, 4 already done, 10 to run" in capsys.readouterr().out
    assert len(calls) == 15 and len(_records(results)) == 14  # the 4 finished were not redone
    assert all(_records(results)[name] == record for name, record in first.items())
