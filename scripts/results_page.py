"""Write docs/results.md and the README's summary table from the benchmark's JSON records.

Nothing in either is typed by hand: both come from the records in benchmarks/results/ through
the same aggregation as ``tinyprop report`` (:func:`tinyprop.bench.report.summarise`).

    python scripts/results_page.py           # rewrite docs/results.md and the README table
    python scripts/results_page.py --check   # exit 1 if either is out of date (make test runs it)
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

from tinyprop.bench import report, store

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PAGE = ROOT / "docs" / "results.md"
README = ROOT / "README.md"
FOLDERS = ("small-finetune", "small-scratch")
README_START, README_END = "<!-- results-summary: start -->", "<!-- results-summary: end -->"
COMMAND = "python scripts/results_page.py"


def load(folder: str) -> tuple[list[dict], list[report.SettingSummary]]:
    """The records of one results folder and their summaries (validation-chosen settings)."""
    records = store.read_records(RESULTS / folder)
    return records, report.summarise(records)


def source_label(summary: report.SettingSummary) -> str:
    """The data source, shortened: "real" when it is the dataset itself."""
    return "real" if summary.source == summary.dataset else summary.source


def plot_path(folder: str, protocol: str, dataset: str) -> str | None:
    """The plot of one dataset relative to docs/, SVG when there is one."""
    for suffix in (".svg", ".png"):
        path = RESULTS / folder / f"plot_{protocol}_{dataset}{suffix}"
        if path.is_file():
            return f"results/{folder}/{path.name}"
    return None


def chosen_table(summaries: list[report.SettingSummary]) -> list[str]:
    """Every policy's validation-chosen setting per dataset, as a Markdown table."""
    finetune = any(s.pretrained_mean is not None for s in summaries)
    lines = [
        "| dataset | source | policy | setting | test metric (mean ± std) | drop (pp) | "
        "backward % | total % | skip % |" + (" pretrained |" if finetune else ""),
        "|---|---|---|---|---|---:|---:|---:|---:|" + ("---:|" if finetune else ""),
    ]
    for s in summaries:
        if not s.chosen:
            continue
        drop = "" if s.drop_pp is None else f"{s.drop_pp:+.2f}"
        before = "" if s.pretrained_mean is None else f" {s.pretrained_mean:.2f} |"
        lines.append(
            f"| {s.dataset} | {source_label(s)} | {s.policy} | {s.setting} | {s.metric_name} "
            f"{s.metric_mean:.2f} ± {s.metric_std:.2f} | {drop} | {s.backward_pct:.1f} | "
            f"{s.compute_pct:.1f} | {s.skip_pct:.1f} |" + (before if finetune else "")
        )
    return lines


def verdicts(summaries: list[report.SettingSummary]) -> list[str]:
    """Per dataset: does tinypropv2's chosen setting meet the target, and if not, why."""
    lines = []
    for s in summaries:
        if s.policy != "tinypropv2" or not s.chosen or s.drop_pp is None:
            continue
        met = s.drop_pp <= report.TARGET_DROP_PP and s.backward_pct <= 100 * report.TARGET_BACKWARD
        options = [
            o
            for o in summaries
            if (o.protocol, o.dataset, o.source, o.policy)
            == (s.protocol, s.dataset, s.source, s.policy)
        ]
        why = "" if met or s.val_drop is None else ": " + report.miss_reason(s, options)
        lines.append(
            f"- **{s.dataset}**: {'meets' if met else 'misses'} the target (drop "
            f"{s.drop_pp:+.2f} pp at {s.backward_pct:.1f}% backward){why}"
        )
    return lines


def provenance(records: list[dict]) -> str:
    """Which code made the records: commits and the number of records each."""
    commits = collections.Counter(str(r.get("commit")) for r in records)
    parts = ", ".join(f"{commit} ({count})" for commit, count in sorted(commits.items()))
    return f"{len(records)} records; commits (records each): {parts}."


def protocol_section(folder: str) -> list[str]:
    records, summaries = load(folder)
    protocol = summaries[0].protocol
    suite = records[0].get("suite", "small")
    lines = [
        f"## {protocol}",
        "",
        f"`tinyprop bench --suite {suite} --protocol {protocol} --results benchmarks/results/"
        f"{folder}` made these records (`make bench-{protocol}` runs it); "
        f"{provenance(records)}",
        "",
        *chosen_table(summaries),
        "",
        f"Target: tinypropv2 within {report.TARGET_DROP_PP:g} pp of full training at no more "
        f"than {100 * report.TARGET_BACKWARD:g}% of its backward compute.",
        "",
        *verdicts(summaries),
        "",
        "At equal compute: of each other policy's settings (every setting, test metric), how "
        "many some tinypropv2 setting matches or beats with no more backward compute.",
        "",
        *report.equal_compute_lines(summaries),
        "",
        "### Plots",
        "",
    ]
    for dataset in sorted({s.dataset for s in summaries}):
        path = plot_path(folder, protocol, dataset)
        if path:
            lines += [f"![{dataset}, {protocol}: test metric vs backward compute]({path})", ""]
    return lines


def page() -> str:
    """The whole of docs/results.md."""
    lines = [
        "# Results",
        "",
        f"<!-- generated by `{COMMAND}` from the JSON records in benchmarks/results/; "
        "do not edit -->",
        "",
        "The benchmark's records, aggregated as `tinyprop report` does (see "
        "[the benchmark page](benchmark.md) for the protocols and [datasets](datasets.md) for "
        "what each source is). Test metric in percent (accuracy; AUC for dcase2020), mean ± "
        "standard deviation over the seeds. Each policy's setting is the one chosen on the "
        "validation split: the cheapest whose mean validation metric is within 1 pp of full "
        "training's. Drop = full's mean minus the policy's (positive = worse). Backward and "
        "total compute are MACs in % of full training's on the same samples "
        "([how they are counted](algorithm.md#how-compute-is-counted)); skip = samples whose "
        "backward TinyPropv2 skipped. Finetune rows also give the pretrained weights' metric.",
        "",
        "Everything except MNIST is a stand-in (named in every row), and the `small` suite's "
        "sizes are small (a few thousand samples): read differences of a few points between "
        "policies as noise unless the standard deviations say otherwise.",
        "",
    ]
    for folder in FOLDERS:
        lines += protocol_section(folder)
    return "\n".join(lines).rstrip() + "\n"


def readme_table() -> str:
    """The README's one summary table: finetune, full vs tinypropv2 per dataset."""
    _, summaries = load("small-finetune")
    full = {s.dataset: s for s in summaries if s.policy == "full" and s.chosen}
    lines = [
        README_START,
        f"<!-- generated by `{COMMAND}`; do not edit -->",
        "",
        "| dataset (source) | full | tinypropv2 | drop (pp) | backward % | total % | skipped % |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        if s.policy != "tinypropv2" or not s.chosen:
            continue
        lines.append(
            f"| {s.dataset} ({source_label(s)}) | {full[s.dataset].metric_mean:.2f} | "
            f"{s.metric_mean:.2f} | {s.drop_pp:+.2f} | {s.backward_pct:.1f} | "
            f"{s.compute_pct:.1f} | {s.skip_pct:.1f} |"
        )
    return "\n".join([*lines, README_END])


def with_readme_table(text: str) -> str:
    start, end = text.index(README_START), text.index(README_END) + len(README_END)
    return text[:start] + readme_table() + text[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if anything is stale")
    args = parser.parse_args(argv)
    wanted = {PAGE: page(), README: with_readme_table(README.read_text())}
    stale = [
        path for path, text in wanted.items() if not path.is_file() or path.read_text() != text
    ]
    if args.check:
        for path in stale:
            print(f"{path.relative_to(ROOT)} is out of date: run {COMMAND}", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        path.write_text(wanted[path])
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
