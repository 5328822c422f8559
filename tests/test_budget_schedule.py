"""The budget spent unevenly over a run (``budget_schedule``): the run's ratio still holds b,
the steps spend more where the schedule says, bad settings refused (exact resume with a
schedule: tests/test_budget.py)."""

import dataclasses

import pytest
from test_budget import ratio, run, toy_model, toy_stream

import tinyprop
from tinyprop.bench import runner, suites
from tinyprop.functional import scheduled_budget

STEPS = 300


@pytest.mark.parametrize("policy", ["tinypropv2", "topk", "selective_backprop"])
@pytest.mark.parametrize("schedule", [0.5, -0.5])
def test_the_run_holds_its_budget_and_spends_it_where_the_schedule_says(policy, schedule):
    config = tinyprop.TinyPropConfig(
        policy=policy, budget=0.2, budget_schedule=schedule, budget_steps=STEPS
    )
    ledgers = run(toy_model(config), toy_stream(STEPS))
    assert abs(ratio(ledgers) / 0.2 - 1) <= 0.10, ratio(ledgers)
    first, last = ratio(ledgers[: STEPS // 3]), ratio(ledgers[-STEPS // 3 :])
    # planned: 0.2 (1 + a (1 - 1/3)) over the first third, 0.2 (1 - a (1 - 1/3)) over the last
    assert first == pytest.approx(0.2 * (1 + schedule * 2 / 3), rel=0.15), (first, last)
    assert last == pytest.approx(0.2 * (1 - schedule * 2 / 3), rel=0.15), (first, last)


def test_without_a_schedule_every_part_of_the_run_spends_the_same():
    config = tinyprop.TinyPropConfig(policy="tinypropv2", budget=0.2)
    ledgers = run(toy_model(config), toy_stream(STEPS))
    first, last = ratio(ledgers[: STEPS // 3]), ratio(ledgers[-STEPS // 3 :])
    assert first == pytest.approx(0.2, rel=0.10) and last == pytest.approx(0.2, rel=0.10)


def test_scheduled_budget_falls_linearly_and_averages_to_the_budget():
    steps = [scheduled_budget(0.2, 0.5, n, 10)[1] for n in range(10)]
    assert steps[0] == pytest.approx(0.29) and steps[-1] == pytest.approx(0.11)
    assert sum(steps) / 10 == pytest.approx(0.2)
    for n in range(1, 11):  # the run's budget after n steps is the mean of the first n steps'
        assert scheduled_budget(0.2, 0.5, n, 10)[0] == pytest.approx(
            sum(scheduled_budget(0.2, 0.5, m, 10)[1] for m in range(n)) / n
        )
    assert scheduled_budget(0.2, 0.5, 12, 10) == (0.2, 0.2)  # after T steps: b
    assert scheduled_budget(0.2, 0.0, 3, 10) == (0.2, 0.2)


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"budget_schedule": 0.5, "budget_steps": 10}, "set budget too"),
        ({"budget": 0.2, "budget_schedule": 0.5}, "budget_steps"),
        ({"budget": 0.6, "budget_schedule": 0.8, "budget_steps": 10}, "more than full"),
        ({"budget": 0.2, "budget_schedule": 1.0, "budget_steps": 10}, r"\(-1, 1\)"),
        ({"budget": 0.2, "budget_schedule": float("nan"), "budget_steps": 10}, r"\(-1, 1\)"),
        ({"budget": 0.2, "budget_schedule": "early", "budget_steps": 10}, "number"),
        ({"budget": 0.2, "budget_schedule": 0.5, "budget_steps": 0}, "positive int"),
        ({"budget": 0.2, "budget_schedule": 0.5, "budget_steps": 2.5}, "positive int"),
    ],
)
def test_bad_schedules_are_refused(fields, words):
    with pytest.raises((ValueError, TypeError), match=words):
        tinyprop.TinyPropConfig(policy="tinypropv2", **fields)


def test_the_bench_gives_a_schedule_the_run_length():
    suite = suites.get("budget")
    spec = runner.RunSpec(
        suite=suite.name, dataset="cifar10", protocol="finetune", policy="tinypropv2",
        settings={"budget": 0.2, "budget_schedule": 0.5}, plan=suite.datasets["cifar10"],
    )  # fmt: skip
    config = runner.run_config(spec, train_samples=900)
    assert config.budget_steps == 2 * 29  # 2 epochs of 900 samples in batches of 32
    assert spec.settings_label == "budget=0.2,budget_schedule=0.5"
    without = dataclasses.replace(spec, settings={"budget": 0.2})
    assert runner.run_config(without, train_samples=900).budget_steps is None


def test_the_bench_plans_a_schedule_before_the_run_length_is_known(tmp_path):
    (spec,) = runner.plan_runs(
        suites.get("budget"), "finetune", str(tmp_path), datasets=["cifar10"],
        policies=["tinypropv2"], seeds=[0], labels=["budget=0.2,budget_schedule=0.5"],
    )  # fmt: skip
    assert spec.settings == {"budget": 0.2, "budget_schedule": 0.5}
