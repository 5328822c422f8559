"""``tinyprop report RESULTS_DIR``: Markdown and CSV tables and accuracy-vs-compute plots.

Per dataset: full training's metric; each policy's metric at the setting chosen on the
validation split (the cheapest within ``--tolerance`` pp of full training's validation metric;
never by the test metric), its drop vs full in percentage points, total and
backward compute in % of full, and skip rate; means and standard deviations over seeds, and the
data source of every row. Writes ``report.md``, ``report.csv`` (chosen settings),
``report_settings.csv`` (every setting) and ``plot_<protocol>_<dataset>.png`` into the folder.

Example:
    tinyprop report benchmarks/results/small-finetune
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from tinyprop import cli_types
from tinyprop.bench import store

POLICY_ORDER = ("full", "topk", "randomk", "tinyprop", "tinypropv2", "selective_backprop")
TARGET_DROP_PP = 1.0  # issue 5: tinypropv2 within 1 pp of full ...
TARGET_BACKWARD = 0.20  # ... at no more than 20% of full training's backward compute


@dataclass
class SettingSummary:
    """One (protocol, dataset, policy, setting) aggregated over seeds."""

    protocol: str
    dataset: str
    source: str
    model: str
    policy: str
    setting: str
    seeds: int
    metric_name: str
    metric_mean: float
    metric_std: float
    val_metric_mean: float
    val_metric_name: str
    compute_pct: float
    backward_pct: float
    skip_pct: float
    pretrained_mean: float | None = None  # finetune: test metric of the pretrained weights
    drop_pp: float | None = None  # full's mean metric minus this one (positive = worse)
    chosen: bool = False
    val_samples: float | None = None  # validation samples per seed (mean over seeds)
    # full's mean validation metric minus this one, in the unit of the tolerance (pp; for a
    # reconstruction error, percent of full training's error); positive = worse than full
    val_drop: float | None = None


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _policy_rank(policy: str) -> tuple[int, str]:
    return (POLICY_ORDER.index(policy) if policy in POLICY_ORDER else len(POLICY_ORDER), policy)


def tolerance_for(reference: SettingSummary, tolerance: float) -> float:
    """The validation tolerance in the metric's unit: ``tolerance`` percentage points, or for
    a reconstruction error (``neg_mse``, DCASE's normal-only validation) ``tolerance`` percent
    of full training's error."""
    if reference.val_metric_name == "neg_mse":
        return abs(reference.val_metric_mean) * tolerance / 100
    return tolerance


def validation_drop(summary: SettingSummary, full: SettingSummary) -> float:
    """How far ``summary``'s mean validation metric is below full training's, in the unit of the
    tolerance: percentage points, or for a reconstruction error (``neg_mse``) percent of full
    training's error. Positive = worse than full."""
    drop = full.val_metric_mean - summary.val_metric_mean
    if full.val_metric_name == "neg_mse":
        return 100 * drop / abs(full.val_metric_mean) if full.val_metric_mean else 0.0
    return drop


def miss_reason(
    chosen: SettingSummary, options: list[SettingSummary], tolerance: float = 1.0
) -> str:
    """Why ``chosen`` (a policy's validation-chosen setting) misses the target, from the
    numbers: the cheap settings' validation drops (when it runs above the backward target)
    and its test drop against its validation drop (when it is more than the target below full).

    Args:
        chosen: the chosen setting (with ``drop_pp`` and ``val_drop`` filled in).
        options: every setting of the same policy, dataset and protocol.
        tolerance: the validation tolerance the choice used.
    """
    unit = "% of full's validation error" if chosen.val_metric_name == "neg_mse" else " pp"
    per_seed = (
        f", {chosen.val_samples:.0f} validation samples per seed" if chosen.val_samples else ""
    )
    reasons = []
    if chosen.backward_pct > 100 * TARGET_BACKWARD:
        cheap = [s for s in options if s.backward_pct <= 100 * TARGET_BACKWARD]
        if not cheap:
            reasons.append(f"no setting of the grid runs at <= {100 * TARGET_BACKWARD:g}% backward")
        else:
            best = min(cheap, key=lambda s: s.val_drop if s.val_drop is not None else float("inf"))
            reasons.append(
                f"every setting at <= {100 * TARGET_BACKWARD:g}% backward was more than the "
                f"tolerance below full on validation (closest: {best.setting} at "
                f"{best.backward_pct:.1f}% backward, validation {best.val_drop:+.2f}{unit}, test "
                f"{best.drop_pp:+.2f} pp)"
            )
    if chosen.drop_pp is not None and chosen.drop_pp > TARGET_DROP_PP:
        reasons.append(
            f"validation put the chosen setting {chosen.val_drop:+.2f}{unit} from full "
            f"(tolerance {tolerance:g}{per_seed}), the test split {chosen.drop_pp:+.2f} pp"
        )
    return "; ".join(reasons)


def choose_setting(
    options: list[SettingSummary], full: SettingSummary | None, tolerance: float
) -> SettingSummary:
    """A policy's setting, from validation metrics only: the one with the least backward compute
    among those within ``tolerance`` of full training's validation metric; when none is (or
    there is no full run), the one with the best validation metric."""
    if full is not None and tolerance >= 0:
        floor = full.val_metric_mean - tolerance_for(full, tolerance)
        close = [option for option in options if option.val_metric_mean >= floor]
        if close:
            return min(close, key=lambda s: (s.backward_pct, -s.val_metric_mean))
    return max(options, key=lambda s: (s.val_metric_mean, -s.backward_pct))


def summarise(records: list[dict], tolerance: float = 1.0) -> list[SettingSummary]:
    """Aggregate records over seeds, choose each policy's setting on the validation split and
    fill in the drop vs full.

    The chosen setting of a policy is the cheapest (least backward compute) whose mean
    validation metric is within ``tolerance`` percentage points of full training's; when none
    is, the one with the best mean validation metric (:func:`choose_setting`). The test metric
    plays no part. The drop is ``mean(full) - mean(policy)`` in percentage points.

    Args:
        records: run records (see ``tinyprop.bench.store``).
        tolerance: validation tolerance in percentage points (negative: best validation metric).

    Returns:
        One :class:`SettingSummary` per (protocol, dataset, policy, setting), sorted.
    """
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        label = record.get("settings_label") or _label(record["settings"])
        key = (record["protocol"], record["dataset"], record["source"], record["policy"], label)
        groups.setdefault(key, []).append(record)
    summaries = []
    for (protocol, dataset, source, policy, label), group in groups.items():
        metric = [float(r["metric"]) for r in group]
        before = [
            float(r["pretrained_metric"]) for r in group if r.get("pretrained_metric") is not None
        ]
        summaries.append(
            SettingSummary(
                protocol=protocol,
                dataset=dataset,
                source=source,
                model=group[0]["model"],
                policy=policy,
                setting=label,
                seeds=len(group),
                metric_name=group[0]["metric_name"],
                metric_mean=statistics.fmean(metric),
                metric_std=_std(metric),
                val_metric_mean=statistics.fmean(float(r["val_metric"]) for r in group),
                val_metric_name=group[0].get("val_metric_name", group[0]["metric_name"]),
                compute_pct=100 * statistics.fmean(float(r["compute_ratio"]) for r in group),
                backward_pct=100 * statistics.fmean(float(r["backward_ratio"]) for r in group),
                skip_pct=100 * statistics.fmean(float(r["skip_rate"]) for r in group),
                pretrained_mean=statistics.fmean(before) if before else None,
                val_samples=statistics.fmean(int(r["val_samples"]) for r in group)
                if all("val_samples" in r for r in group)
                else None,
            )  # fmt: skip
        )
    by_policy: dict[tuple, list[SettingSummary]] = {}
    for summary in summaries:
        key = (summary.protocol, summary.dataset, summary.source, summary.policy)
        by_policy.setdefault(key, []).append(summary)
    for key, options in by_policy.items():
        reference = by_policy.get((*key[:3], "full"))
        choose_setting(options, reference[0] if reference else None, tolerance).chosen = True
    full = {
        (s.protocol, s.dataset, s.source): s for s in summaries if s.policy == "full" and s.chosen
    }
    for summary in summaries:
        reference = full.get((summary.protocol, summary.dataset, summary.source))
        if reference is not None:
            summary.drop_pp = reference.metric_mean - summary.metric_mean
            summary.val_drop = validation_drop(summary, reference)
    summaries.sort(
        key=lambda s: (s.protocol, s.dataset, s.source, _policy_rank(s.policy), s.backward_pct)
    )
    return summaries


def _label(settings: dict) -> str:
    from tinyprop.bench.suites import settings_label

    return settings_label(settings)


def _format_metric(summary: SettingSummary) -> str:
    return f"{summary.metric_mean:.2f} ± {summary.metric_std:.2f}"


def markdown(summaries: list[SettingSummary], tolerance: float = 1.0) -> str:
    """The report as Markdown: one table per protocol, chosen settings only."""
    lines = [
        "# Benchmark report",
        "",
        "Metric in percent on the test split (accuracy; AUC for dcase2020), mean ± std over "
        "seeds. Each policy's setting was chosen on the validation split (carved from the "
        "training data), never by the test metric: the one with the least backward compute "
        "whose mean validation metric is within the tolerance (1 pp unless stated) of full "
        "training's, else the best on validation. Drop = full's mean minus the "
        "policy's mean, in percentage points (positive = worse than full). Compute: total "
        "(forward + backward + selection) and backward (+ selection) MACs in % of full "
        "training's on the same samples. Skip: share of samples whose backward was skipped. "
        "Pretrained (finetune only): the test metric of the pretrained weights every policy "
        "starts from, before on-device training.",
    ]
    for protocol in sorted({s.protocol for s in summaries}):
        chosen = [s for s in summaries if s.protocol == protocol and s.chosen]
        pretrained = any(s.pretrained_mean is not None for s in chosen)
        lines += [
            "",
            f"## Protocol: {protocol}",
            "",
            "| dataset | source | policy | setting | seeds | metric | drop (pp) | total % | "
            "backward % | skip % |" + (" pretrained |" if pretrained else ""),
            "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if pretrained else ""),
        ]
        for s in chosen:
            drop = "" if s.drop_pp is None else f"{s.drop_pp:+.2f}"
            before = "" if s.pretrained_mean is None else f" {s.pretrained_mean:.2f} |"
            lines.append(
                f"| {s.dataset} | {s.source} | {s.policy} | {s.setting} | {s.seeds} | "
                f"{s.metric_name} {_format_metric(s)} | {drop} | {s.compute_pct:.1f} | "
                f"{s.backward_pct:.1f} | {s.skip_pct:.1f} |"
                + (before or (" |" if pretrained else ""))
            )
        verdicts = []
        for s in chosen:
            if s.policy != "tinypropv2" or s.drop_pp is None:
                continue
            met = s.drop_pp <= TARGET_DROP_PP and s.backward_pct <= 100 * TARGET_BACKWARD
            options = [
                o
                for o in summaries
                if (o.protocol, o.dataset, o.source, o.policy)
                == (s.protocol, s.dataset, s.source, s.policy)
            ]
            verdicts.append(
                f"- {s.dataset}: {'meets' if met else 'misses'} the target (drop "
                f"{s.drop_pp:+.2f} pp, backward {s.backward_pct:.1f}% of full, total "
                f"{s.compute_pct:.1f}%)"
                + ("" if met or s.val_drop is None else ": " + miss_reason(s, options, tolerance))
            )
        if verdicts:
            lines += [
                "",
                f"Target: tinypropv2 within {TARGET_DROP_PP:g} pp of full at no more than "
                f"{100 * TARGET_BACKWARD:g}% of full backward compute.",
                *verdicts,
            ]
        lines += budget_table([s for s in summaries if s.protocol == protocol])
        comparison = equal_compute_lines([s for s in summaries if s.protocol == protocol])
        if comparison:
            lines += [
                "",
                "At equal compute (every setting, test metric, as in the plots): how many of each "
                "other policy's settings some tinypropv2 setting matches or beats with no more "
                "backward compute.",
                *comparison,
            ]
    return "\n".join(lines) + "\n"


def budget_of(setting: str) -> float | None:
    """The ``budget`` of a settings label (None for a label without one, or with any other
    change such as ``optimizer=sgd`` or ``zeta=1.0``: the equal-compute table holds the budget
    runs at their defaults only).

    Example:
        >>> budget_of("budget=0.1,dense_output_layer=True")
        0.1
    """
    fields = dict(item.partition("=")[::2] for item in setting.split(","))
    if "budget" not in fields or set(fields) - {"budget", "dense_output_layer"}:
        return None
    return float(fields["budget"])


def budget_table(summaries: list[SettingSummary]) -> list[str]:
    """The equal-compute table: every policy's test metric at each budget (mean ± std over
    seeds) with the backward ratio it reached, one row per dataset and policy."""
    budgets = sorted({b for s in summaries if (b := budget_of(s.setting)) is not None})
    if not budgets:
        return []
    lines = [
        "",
        "Equal compute: every policy held at the same backward budget b (`budget` setting, no "
        "other choice); test metric mean ± std over seeds, in brackets the backward % reached. "
        "Full training's metric for reference.",
        "",
        "| dataset | policy | full | " + " | ".join(f"b = {b:g}" for b in budgets) + " |",
        "|---|---|---|" + "---|" * len(budgets),
    ]
    full = {s.dataset: s for s in summaries if s.policy == "full" and s.chosen}
    groups: dict[tuple, dict] = {}
    for s in summaries:
        if (budget := budget_of(s.setting)) is not None:
            groups.setdefault((s.dataset, _policy_rank(s.policy)), {})[budget] = s
    for (dataset, (_, policy)), by_budget in sorted(groups.items()):
        reference = full.get(dataset)
        cells = [
            f"{_format_metric(by_budget[b])} ({by_budget[b].backward_pct:.1f})"
            if b in by_budget
            else ""
            for b in budgets
        ]
        lines.append(
            f"| {dataset} | {policy} | {_format_metric(reference) if reference else ''} | "
            + " | ".join(cells)
            + " |"
        )
    return lines


def matched_by(points: list[SettingSummary], rivals: list[SettingSummary]) -> int:
    """How many of ``points`` some rival matches or beats in metric at no more backward compute."""
    return sum(
        any(r.backward_pct <= p.backward_pct and r.metric_mean >= p.metric_mean for r in rivals)
        for p in points
    )


def equal_compute_lines(summaries: list[SettingSummary]) -> list[str]:
    """Per dataset: tinypropv2 against every other sparse policy at equal backward compute."""
    lines = []
    for dataset in sorted({s.dataset for s in summaries}):
        group = [s for s in summaries if s.dataset == dataset]
        v2 = [s for s in group if s.policy == "tinypropv2"]
        if not v2:
            continue
        counts = []
        for policy in ("topk", "randomk", "tinyprop"):
            points = [s for s in group if s.policy == policy]
            if points:
                counts.append(f"{policy} {matched_by(points, v2)}/{len(points)}")
        if counts:
            lines.append(f"- {dataset}: " + ", ".join(counts))
    return lines


CSV_COLUMNS = [
    "protocol", "dataset", "source", "model", "policy", "setting", "chosen", "seeds",
    "metric_name", "metric_mean", "metric_std", "drop_pp", "compute_pct", "backward_pct",
    "skip_pct", "val_metric_mean", "val_drop", "val_samples", "pretrained_mean",
]  # fmt: skip


def write_csv(summaries: list[SettingSummary], path: Path) -> None:
    """Write summaries as CSV (columns :data:`CSV_COLUMNS`)."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for summary in summaries:
            writer.writerow(asdict(summary))


def build_report(
    folder: str | Path, out: str | Path | None = None, plots: bool = True, tolerance: float = 1.0
) -> str:
    """Read the records in ``folder`` and write the report files into ``out`` (default: the
    same folder).

    Returns:
        The Markdown text.

    Example:
        >>> print(build_report("benchmarks/results/small-finetune"))  # doctest: +SKIP
    """
    if plots:  # before anything is written: one clear line when matplotlib is missing
        from tinyprop.extras import require

        require("matplotlib", "bench", "pass --no-plots for the tables alone")
    records = store.read_records(folder)
    if not records:
        raise ValueError(f"no run records in {folder}: run `tinyprop bench` into it first")
    out = Path(out or folder)
    out.mkdir(parents=True, exist_ok=True)
    summaries = summarise(records, tolerance)
    text = markdown(summaries, tolerance)
    (out / "report.md").write_text(text)
    write_csv([s for s in summaries if s.chosen], out / "report.csv")
    write_csv(summaries, out / "report_settings.csv")
    if plots:
        from tinyprop.bench.plots import plot_all

        plot_all(summaries, out)
    return text


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``tinyprop report``; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="tinyprop report", description="Tables (Markdown, CSV) and plots from run records."
    )
    parser.add_argument("results", metavar="RESULTS_DIR", help="folder of run records")
    parser.add_argument("--out", help="where to write the report (default: RESULTS_DIR)")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    parser.add_argument(
        "--tolerance",
        type=cli_types.finite_float,
        default=1.0,
        help="choose each policy's cheapest setting within this many pp of full training's "
        "validation metric (default 1.0; negative: the best validation metric)",
    )
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            text = build_report(
                args.results, args.out, plots=not args.no_plots, tolerance=args.tolerance
            )
    except (FileNotFoundError, NotADirectoryError, ValueError) as error:
        print(f"tinyprop report: {error}", file=sys.stderr)
        return 2
    finally:
        for warning in caught:  # e.g. the records skipped as unreadable, each named
            print(f"tinyprop report: {warning.message}", file=sys.stderr)
    print(text)
    return 0
