"""Accuracy (or AUC) vs backward compute plots, one PNG per protocol and dataset."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MARKERS = {"full": "*", "topk": "o", "randomk": "s", "tinyprop": "^", "tinypropv2": "D"}


def plot_dataset(summaries: list, path: Path) -> None:
    """Plot one dataset's settings: x = backward compute in % of full, y = test metric (mean
    over seeds, std as error bar); one curve per policy through its settings, every point
    labelled by policy and setting, the validation-chosen setting drawn larger."""
    figure, axes = plt.subplots(figsize=(8, 5.5))
    policies = sorted(
        {s.policy for s in summaries},
        key=lambda p: list(MARKERS).index(p) if p in MARKERS else len(MARKERS),
    )
    for policy in policies:
        points = sorted((s for s in summaries if s.policy == policy), key=lambda s: s.backward_pct)
        xs = [s.backward_pct for s in points]
        ys = [s.metric_mean for s in points]
        line = axes.errorbar(
            xs,
            ys,
            yerr=[s.metric_std for s in points],
            marker=MARKERS.get(policy, "x"),
            capsize=3,
            label=policy,
        )
        for s in points:
            if s.chosen:
                axes.plot(
                    s.backward_pct,
                    s.metric_mean,
                    marker=MARKERS.get(policy, "x"),
                    markersize=13,
                    markerfacecolor="none",
                    color=line[0].get_color(),
                )
            axes.annotate(
                f"{policy} {s.setting}",
                (s.backward_pct, s.metric_mean),
                fontsize=6,
                xytext=(3, 3),
                textcoords="offset points",
            )
    first = summaries[0]
    axes.set_xlabel("backward compute (% of full training, MACs)")
    axes.set_ylabel(f"test {first.metric_name} (%)")
    axes.set_title(f"{first.dataset} ({first.source}), {first.model}, {first.protocol}", fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(title="policy (large ring: chosen on validation)", fontsize=7, title_fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_all(summaries: list, out: Path) -> list[Path]:
    """One PNG per (protocol, dataset, source) in ``out``; returns the paths."""
    paths = []
    keys = sorted({(s.protocol, s.dataset, s.source) for s in summaries})
    for protocol, dataset, source in keys:
        group = [
            s for s in summaries if (s.protocol, s.dataset, s.source) == (protocol, dataset, source)
        ]
        path = Path(out) / f"plot_{protocol}_{dataset}.png"
        plot_dataset(group, path)
        paths.append(path)
    return paths
