"""The sweep's figures (metrics.png, traces.png), checked on the matplotlib objects that are saved: a title
on every panel, no empty CLAP panel (the title says why), no tempo wording without a tempo concept,
whole-number ticks for K, legends that leave the points visible."""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib")

from musicrfm.evaluation.presets import REFERENCE, REFERENCE_GROUP, SweepSettings  # noqa: E402
from musicrfm.evaluation.report import metrics_figure, traces_figure  # noqa: E402


def _settings(preset: str, **kw) -> SweepSettings:
    return SweepSettings(preset=preset, banks=("notes.safetensors",), out="unused", model="musicgen-mini", **kw)


def _rows(xs, concept: str = "notes", clap=None, group=str) -> list[dict]:
    ref = {"group": REFERENCE_GROUP, "concept": concept, "role": "", "x": None, "fd": None, "mmd2": None,
           "clap": "unavailable" if clap is None else 0.2, "check_acc": 0.08, "probe_acc": "unavailable"}
    rows = [ref]
    for i, x in enumerate(xs):
        rows.append({"group": group(x), "concept": concept, "role": "", "x": x, "fd": 500.0 + 400 * i,
                     "mmd2": 0.01 * (i + 1), "clap": "unavailable" if clap is None else clap - 0.01 * i,
                     "check_acc": 0.2 + 0.15 * i, "probe_acc": "unavailable"})
    return rows


def _titles(fig) -> list[str]:
    return [ax.get_title() for ax in fig.axes]


def _legend_clear_of_points(ax) -> bool:
    legend = ax.get_legend()
    if legend is None:
        return True
    box = legend.get_window_extent()
    for line in ax.get_lines():
        if line.get_marker() in (None, "None", ""):
            continue
        for x, y in ax.transData.transform(line.get_xydata()):
            if box.contains(x, y):
                return False
    return True


def test_without_clap_scores_the_clap_panel_is_left_out_and_the_title_says_why():
    import matplotlib.pyplot as plt

    fig = metrics_figure(_settings("eta"), _rows([10, 25, 50, 100, 200]), note="")
    try:
        fig.canvas.draw()
        titles = _titles(fig)
        assert len(titles) == 3 and all(titles) and not any("CLAP" in t for t in titles)
        assert "no CLAP panel: no CLAP weights supplied (--clap)" in fig.get_suptitle()
        for ax in fig.axes:
            assert "tempo" not in ax.get_xlabel()  # no tempo concept in this sweep
            assert ax.get_legend().get_frame().get_alpha() == pytest.approx(0.85)
            assert _legend_clear_of_points(ax)
    finally:
        plt.close(fig)


def test_with_clap_scores_every_panel_is_there_and_tempo_is_named_when_swept():
    import matplotlib.pyplot as plt

    fig = metrics_figure(_settings("eta", clap="laion/clap-htsat-unfused"), _rows([10, 25, 50], "tempos", clap=0.3),
                         note="")
    try:
        titles = _titles(fig)
        assert len(titles) == 4 and all(titles) and any(t.startswith("CLAP") for t in titles)
        assert "no CLAP panel" not in fig.get_suptitle()
        assert all("|eta0| for tempos" in ax.get_xlabel() for ax in fig.axes)
    finally:
        plt.close(fig)


def test_k_is_plotted_on_whole_numbers():
    import matplotlib.pyplot as plt

    fig = metrics_figure(_settings("topk"), _rows([1, 2, 3, 4]), note="")
    try:
        fig.canvas.draw()
        for ax in fig.axes:
            lo, hi = sorted(ax.get_xlim())
            ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
            assert ticks and all(float(t).is_integer() for t in ticks), ticks
            assert ax.get_xlabel() == "K (layers steered)"
    finally:
        plt.close(fig)


def test_configurations_without_a_numeric_axis_are_labelled_and_titled():
    import matplotlib.pyplot as plt

    rows = _rows([None, None], group=lambda x: "")
    for i, r in enumerate(rows[1:]):
        r["group"] = ["uniform", "exponential"][i]
    fig = metrics_figure(_settings("layers"), rows, note="random weights")
    try:
        assert all(_titles(fig))
        assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["uniform", "exponential"]
    finally:
        plt.close(fig)


def test_traces_have_a_title_per_panel_and_a_see_through_legend():
    import matplotlib.pyplot as plt

    traces = []
    for config in (REFERENCE, "linear_rise", "fade_in"):
        for source in ("probe", "check"):
            for i in range(8):
                traces.append({"config": config, "source": source, "series": "target", "t": 0.5 * i,
                               "mean": 0.1 + 0.1 * i * (config != REFERENCE), "n": 4})
    fig = traces_figure(_settings("schedules"), traces, note="", probes={})
    try:
        assert len(fig.axes) == 2 and all(_titles(fig)) and fig.get_suptitle()
        for ax in fig.axes:
            assert ax.get_legend().get_frame().get_alpha() == pytest.approx(0.85)
    finally:
        plt.close(fig)
