"""Test metric vs backward compute, one figure per protocol and dataset, as PNG and SVG.

Every setting of every policy is a point (mean over seeds, the standard deviation as an error
bar clipped to the metric's range 0-100%); each policy's Pareto front (the settings that no
cheaper setting of the same policy beats) is joined by a line, dominated settings are drawn
faint; the validation-chosen setting is ringed; full training is a dashed reference line, and
the paper's target (within 1 pp of full at no more than 20% of its backward compute) a shaded
box. Labels name the front's settings and are placed so that they do not overlap.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MARKERS = {"full": "*", "topk": "o", "randomk": "s", "tinyprop": "^", "tinypropv2": "D",
           "selective_backprop": "v"}  # fmt: skip
COLORS = {"full": "black", "topk": "tab:blue", "randomk": "tab:gray", "tinyprop": "tab:green",
          "tinypropv2": "tab:red", "selective_backprop": "tab:purple"}  # fmt: skip
SHORT = {"ratio": "r", "zeta": "ζ", "s_max": "Smax", "s_min": "Smin", "skip_threshold": "τ",
         "d_min": "Dmin", "d_max": "Dmax", "beta": "β", "budget": "b"}  # fmt: skip
METRIC_RANGE = (0.0, 100.0)
TARGET_BACKWARD_PCT, TARGET_DROP_PP = 20.0, 1.0
FORMATS = (".png", ".svg")


def short_setting(setting: str) -> str:
    """``skip_threshold=0.3,zeta=1.0`` -> ``τ0.3 ζ1.0`` (dense_output_layer left out: every
    top-k and random-k setting of the grids has it)."""
    if setting == "default":
        return "default"
    parts = []
    for item in setting.split(","):
        key, _, value = item.partition("=")
        if key != "dense_output_layer":
            parts.append(f"{SHORT.get(key, key)}{value}")
    return " ".join(parts) or "default"


def pareto_front(points: list) -> list:
    """The points no other point beats at no more backward compute, cheapest first."""
    front, best = [], float("-inf")
    for point in sorted(points, key=lambda s: (s.backward_pct, -s.metric_mean)):
        if point.metric_mean > best:
            front.append(point)
            best = point.metric_mean
    return front


def clipped_error(points: list) -> list[list[float]]:
    """Asymmetric error bars: the standard deviation, clipped to the metric's range."""
    low, high = METRIC_RANGE
    below = [min(s.metric_std, s.metric_mean - low) for s in points]
    above = [min(s.metric_std, high - s.metric_mean) for s in points]
    return [[max(0.0, v) for v in below], [max(0.0, v) for v in above]]


def _overlaps(box, boxes) -> bool:
    return any(box.overlaps(other) for other in boxes)


def place_labels(
    axes, figure, labels: list[tuple[float, float, str, str]], points: list[tuple[float, float]]
) -> None:
    """Write each ``(x, y, text, color)`` label at the first of several offsets around its
    point where it overlaps no other label, no plotted point and not the axes' edge; a label
    with no free place is left out (its point keeps its marker and the legend)."""
    renderer = figure.canvas.get_renderer()
    taken = []
    to_display = axes.transData.transform
    for x, y in points:  # every marker is taken
        px, py = to_display((x, y))
        taken.append(matplotlib.transforms.Bbox([[px - 9, py - 9], [px + 9, py + 9]]))
    frame = axes.get_window_extent(renderer)
    offsets = [(6, 4), (6, -10), (-6, 4), (-6, -10), (0, 10), (0, -16), (14, 12), (14, -18),
               (-14, 12), (-14, -18), (24, 0), (-24, 0), (0, 22), (0, -28)]  # fmt: skip
    for x, y, text, color in labels:
        for dx, dy in offsets:
            label = axes.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points",
                                  fontsize=7, color=color, ha="left" if dx >= 0 else "right",
                                  va="bottom")  # fmt: skip
            box = label.get_window_extent(renderer).padded(3)
            inside = frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1)
            if inside and not _overlaps(box, taken):
                taken.append(box)
                break
            label.remove()


def plot_dataset(summaries: list, path: Path) -> list[Path]:
    """One dataset's figure, written as ``path`` with each suffix of :data:`FORMATS`."""
    figure, axes = plt.subplots(figsize=(8, 5.5))
    order = list(MARKERS)
    policies = sorted({s.policy for s in summaries},
                      key=lambda p: order.index(p) if p in order else len(order))  # fmt: skip
    full = next((s for s in summaries if s.policy == "full"), None)
    if full is not None:
        axes.axhline(full.metric_mean, color="black", linestyle="--", linewidth=0.8)
        axes.fill_between([1e-3, TARGET_BACKWARD_PCT], full.metric_mean - TARGET_DROP_PP,
                          METRIC_RANGE[1], color="tab:red", alpha=0.06, linewidth=0,
                          label=f"target: ≤{TARGET_DROP_PP:g} pp below full at "
                                f"≤{TARGET_BACKWARD_PCT:g}% backward")  # fmt: skip
    labels = []
    for policy in policies:
        points = [s for s in summaries if s.policy == policy]
        front = pareto_front(points)
        color, marker = COLORS.get(policy, "tab:purple"), MARKERS.get(policy, "x")
        rest = [s for s in points if s not in front]
        if rest:
            axes.errorbar([s.backward_pct for s in rest], [s.metric_mean for s in rest],
                          yerr=clipped_error(rest), fmt=marker, color=color, alpha=0.3,
                          capsize=2, markersize=5, linestyle="none")  # fmt: skip
        axes.errorbar([s.backward_pct for s in front], [s.metric_mean for s in front],
                      yerr=clipped_error(front), fmt=marker + "-", color=color, capsize=3,
                      markersize=7 if policy != "full" else 12, label=policy)  # fmt: skip
        for s in points:
            if s.chosen and policy != "full":
                axes.plot(s.backward_pct, s.metric_mean, marker="o", markersize=15,
                          markerfacecolor="none", markeredgecolor=color)  # fmt: skip
        if policy != "full":
            labels += [(s.backward_pct, s.metric_mean, short_setting(s.setting), color)
                       for s in front]  # fmt: skip
    first = summaries[0]
    source = "real" if first.source == first.dataset else first.source
    axes.set_xscale("log")
    lowest = min(s.backward_pct for s in summaries)
    axes.set_xlim(max(lowest / 1.6, 0.5), 160)
    ticks = [t for t in (1, 2, 5, 10, 20, 50, 100) if t >= lowest / 1.6]
    axes.set_xticks(ticks, [f"{t:g}%" for t in ticks])
    top = max(min(s.metric_mean + s.metric_std, METRIC_RANGE[1]) for s in summaries)
    bottom = min(max(s.metric_mean - s.metric_std, METRIC_RANGE[0]) for s in summaries)
    margin = max(2.0, 0.08 * (top - bottom))
    axes.set_ylim(max(METRIC_RANGE[0], bottom - margin), min(METRIC_RANGE[1] + 0.5, top + margin))
    axes.set_xlabel("backward compute (% of full training's MACs, log scale)")
    axes.set_ylabel(f"test {first.metric_name} (%)")
    axes.set_title(f"{first.dataset} ({source})\n{first.model}, {first.protocol} protocol, mean "
                   f"± std over {first.seeds} seeds", fontsize=9)  # fmt: skip
    axes.grid(alpha=0.3, which="both")
    axes.legend(title="lines: each policy's Pareto front; ring: chosen on validation",
                fontsize=7, title_fontsize=7, loc="lower right")  # fmt: skip
    figure.tight_layout()
    figure.canvas.draw()
    place_labels(axes, figure, labels, [(s.backward_pct, s.metric_mean) for s in summaries])
    written = []
    for suffix in FORMATS:
        target = Path(path).with_suffix(suffix)
        figure.savefig(target, dpi=120, metadata={"Date": None} if suffix == ".svg" else None)
        written.append(target)
    plt.close(figure)
    return written


def plot_all(summaries: list, out: Path) -> list[Path]:
    """One figure per (protocol, dataset, source) in ``out``, PNG and SVG; returns the paths."""
    paths = []
    keys = sorted({(s.protocol, s.dataset, s.source) for s in summaries})
    for protocol, dataset, source in keys:
        group = [
            s for s in summaries if (s.protocol, s.dataset, s.source) == (protocol, dataset, source)
        ]
        paths += plot_dataset(group, Path(out) / f"plot_{protocol}_{dataset}.png")
    return paths
