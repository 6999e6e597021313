"""The probes' figures (`musicrfm train`'s per-layer scores, `musicrfm report`'s bar chart), checked on the
matplotlib objects that are saved: titles, whole-number layer ticks, legends that hide no bar, and R^2
named only where a concept is scored by it."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("matplotlib")

from musicrfm.engine.bank import Provenance  # noqa: E402
from musicrfm.probes.classification import VARIANTS, ReportRow, classification_figure  # noqa: E402
from musicrfm.probes.train import scores_figure  # noqa: E402


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def _visible_ticks(ax) -> list[float]:
    lo, hi = sorted(ax.get_xlim())
    return [t for t in ax.get_xticks() if lo <= t <= hi]


@pytest.mark.parametrize("layers", [[0, 1, 2, 3], list(range(24)), [5, 6]])
def test_layer_scores_have_whole_layer_ticks_a_title_and_a_legend_off_the_curve(layers):
    import matplotlib.pyplot as plt

    n = len(layers)
    scores = torch.linspace(0.55, 0.95, n).repeat(4, 1) + torch.linspace(-0.03, 0.03, 4)[:, None]  # 4 classes
    fig = scores_figure("chords", Provenance("rfm", "auc"), layers, scores)
    try:
        (ax,) = fig.axes
        fig.canvas.draw()
        ticks = _visible_ticks(ax)
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
        assert ax.get_title() == "chords: rfm probes per layer"
        legend = ax.get_legend()
        assert legend is not None and legend.get_frame().get_alpha() == pytest.approx(0.85)
        box = legend.get_window_extent()
        points = ax.transData.transform(list(zip(layers, scores.mean(0).tolist())))
        assert not any(box.contains(x, y) for x, y in points)  # no marker of the mean curve under it
    finally:
        plt.close(fig)


def _rows(concepts: list[str]) -> list[ReportRow]:
    rows = []
    for i, concept in enumerate(concepts):
        for k, (_, _, probe) in enumerate(VARIANTS):
            metric = "r2" if concept == "tempos" else "accuracy"
            rows.append(ReportRow(concept, probe, metric, best_layer=3, val=0.99, test=0.97 - 0.01 * k - 0.02 * i))
    return rows


@pytest.mark.parametrize("concepts", [["notes", "chords"], ["notes"], ["notes", "chords", "tempos"]])
def test_classification_chart_has_a_title_no_stray_r2_and_a_legend_off_the_bars(concepts):
    import matplotlib.pyplot as plt

    fig = classification_figure(_rows(concepts))
    try:
        (ax,) = fig.axes
        fig.canvas.draw()
        assert ax.get_title()
        label = ax.get_ylabel()
        if "tempos" in concepts:
            assert "R$^2$ for tempos" in label
        else:
            assert "R$^2$" not in label and "tempo" not in label
        bars = [p.get_window_extent() for p in ax.patches]
        assert len(bars) == len(concepts) * len(VARIANTS)
        assert [t.get_text() for t in ax.texts].count("L3") == len(bars)  # each bar names its (whole) layer
        legend = ax.get_legend().get_window_extent()
        assert not any(_overlap(legend, bar) for bar in bars)  # the bars reach 0.97 of the scale: none is hidden
        assert legend.x0 >= ax.get_window_extent().x1  # beside the axes
        assert legend.x1 <= fig.bbox.x1 + 1  # and inside the saved image
    finally:
        plt.close(fig)
