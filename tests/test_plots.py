"""The plots: one figure per dataset in PNG and SVG with a single title, each policy's Pareto
front, error bars clipped to the metric's range, labels that do not overlap."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from tinyprop.bench import plots  # noqa: E402
from tinyprop.bench.report import SettingSummary  # noqa: E402


def summary(policy, setting, backward, metric, std=1.0, chosen=False) -> SettingSummary:
    return SettingSummary(
        protocol="finetune", dataset="har", source="basicmotions as har substitute",
        model="cnn1d", policy=policy, setting=setting, seeds=3, metric_name="accuracy",
        metric_mean=metric, metric_std=std, val_metric_mean=metric, val_metric_name="accuracy",
        compute_pct=backward, backward_pct=backward, skip_pct=0.0, chosen=chosen,
    )  # fmt: skip


SUMMARIES = [
    summary("full", "default", 100.0, 100.0, 0.0, chosen=True),
    summary("topk", "dense_output_layer=True,ratio=0.1", 11.6, 99.2, 1.4, chosen=True),
    summary("topk", "dense_output_layer=True,ratio=0.2", 21.5, 96.7, 5.8),  # dominated
    summary("tinypropv2", "skip_threshold=0.5,zeta=1.0", 8.5, 99.2, 1.4, chosen=True),
    summary("tinypropv2", "skip_threshold=0.3,zeta=1.0", 8.9, 98.3, 2.9),  # dominated
    summary("tinypropv2", "skip_threshold=0.1,zeta=1.0", 12.0, 99.6, 0.9),
    summary("tinyprop", "zeta=0.5", 11.7, 90.8, 15.9),
]


def test_pareto_front_keeps_only_undominated_settings():
    front = plots.pareto_front([s for s in SUMMARIES if s.policy == "tinypropv2"])
    assert [s.backward_pct for s in front] == [8.5, 12.0]


def test_error_bars_are_clipped_to_the_metric_range():
    low, high = plots.clipped_error(SUMMARIES)
    for s, below, above in zip(SUMMARIES, low, high, strict=True):
        assert s.metric_mean - below >= 0.0 and s.metric_mean + above <= 100.0
    assert abs(high[1] - 0.8) < 1e-9  # 99.2 + 1.4 would pass 100


def test_short_settings_use_the_paper_symbols():
    assert plots.short_setting("skip_threshold=0.3,zeta=1.0") == "τ0.3 ζ1.0"
    assert plots.short_setting("dense_output_layer=True,ratio=0.1") == "r0.1"


def test_one_figure_per_dataset_in_png_and_svg_with_one_title(tmp_path):
    written = plots.plot_all(SUMMARIES, tmp_path)
    assert sorted(p.name for p in written) == ["plot_finetune_har.png", "plot_finetune_har.svg"]
    svg = (tmp_path / "plot_finetune_har.svg").read_text()
    assert svg.count("basicmotions as har substitute") == 1  # the title, once
    assert (tmp_path / "plot_finetune_har.png").stat().st_size > 10_000


def test_labels_do_not_overlap():
    figure, axes = plt.subplots(figsize=(6, 4))
    points = [(10 + 0.2 * i, 90 + 0.1 * (i % 3)) for i in range(12)]  # a tight cluster
    axes.plot(*zip(*points, strict=True), "o")
    axes.set_xlim(5, 20)
    axes.set_ylim(85, 95)
    figure.canvas.draw()
    labels = [(x, y, f"setting {i}", "black") for i, (x, y) in enumerate(points)]
    plots.place_labels(axes, figure, labels, points)
    renderer = figure.canvas.get_renderer()
    boxes = [text.get_window_extent(renderer) for text in axes.texts]
    assert len(boxes) >= 3  # some fit; the others were left out, none drawn on another
    for i, first in enumerate(boxes):
        for second in boxes[i + 1 :]:
            assert not first.overlaps(second)
    plt.close(figure)
