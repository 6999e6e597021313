"""`musicrfm report`: the probes' classification report, the paper's Table 1 protocol on extracted features:
how well each concept can be read off MusicGen (not how steered audio sounds: that is evaluation/).

Per concept and probe, on the same seeded stratified 70/15/15 split as `train`: a multiclass probe per layer
(a regression for tempo), the layer with the best validation score kept, and its score on the held-out test
part reported: accuracy, or R^2 for tempo, with the validation score and the validation AUC (mean
one-vs-rest) of the kept layer. The probes (VARIANTS):

  RFM, mean-pooled, shared M     ours: one multi-output RFM per layer, one M for all classes
  RFM, mean-pooled, per-class M  the paper's binary probes: one RFM per class with its own M, argmax of the
                                 classes' binary scores
  RFM aggregated over layers     the paper's aggregation model: every layer's shared-M probe gives the top
                                 `components` eigenvectors of its AGOP; an RFM on the concatenated projections
                                 (no best layer: it reads them all)
  RFM, last position             shared M on the last position's features (the paper's ablation)
  linear probe, mean-pooled      ridge on one-hot targets

Tempo (a regression, one output) gets the shared-M, last-position and linear rows only: per-class M is the
same probe there, and the aggregation model is implemented for classification. Writes a CSV and a grouped
bar chart. A layer where no probe can be fitted (rfm.ProbeFailure) is reported on stderr and skipped.
"""

from __future__ import annotations

import csv
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from .extract import load_features
from .rfm import ProbeFailure
from .train import REGRESSION_CONCEPTS, split_indices

SHARED, PER_CLASS, AGGREGATED, LAST, LINEAR = ("RFM, mean-pooled, shared M", "RFM, mean-pooled, per-class M",
                                              "RFM aggregated over layers", "RFM, last position",
                                              "linear probe, mean-pooled")
# (method, pooling, row name), in report order. The aggregated row reuses the shared-M row's layer probes.
VARIANTS = (("rfm", "mean", SHARED), ("rfm-per-class", "mean", PER_CLASS), ("rfm-aggregated", "mean", AGGREGATED),
            ("rfm", "last", LAST), ("linear", "mean", LINEAR))
CSV_COLUMNS = ("concept", "probe", "metric", "best_layer", "validation", "val_auc", "test")
# Per layer, the aggregation model keeps this many top AGOP eigenvectors (the paper tried 2-10 for notes).
DEFAULT_COMPONENTS = 8


@dataclass(frozen=True)
class ReportRow:
    concept: str
    probe: str
    metric: str  # "accuracy" or "r2"
    best_layer: int | None  # None: the aggregated probe, which reads every layer
    val: float  # validation score of the kept layer, in `metric`
    test: float  # held-out test score, in `metric`
    val_auc: float = float("nan")  # mean one-vs-rest validation AUC of the kept layer (NaN for a regression)


def _r2(pred: torch.Tensor, y: torch.Tensor) -> float:
    y = y.double()
    return float(1 - (pred.double() - y).square().sum() / (y - y.mean()).square().sum())


def _accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    return float((pred.cpu() == y).float().mean())


def _fit_and_score(method: str, regression: bool, X_tr, y_tr, X_val, y_val, X_te, y_te, num_classes, search):
    """(validation score, validation AUC, test score, fitted probe) of one probe on one layer."""
    from . import baselines, rfm

    if regression:
        model = (rfm.fit_regression(X_tr, y_tr, X_val, y_val, search) if method == "rfm"
                 else baselines.fit_linear_regression(X_tr, y_tr, X_val, y_val))
        return _r2(model.predict(X_val), y_val), math.nan, _r2(model.predict(X_te), y_te), model
    if method == "linear":
        model = baselines.fit_linear_multiclass(X_tr, y_tr, X_val, y_val, num_classes)
    else:
        model = rfm.fit_multiclass(X_tr, y_tr, X_val, y_val, num_classes, search,
                                   shared_metric=method != "rfm-per-class")
    return model.val_accuracy, model.val_auc, _accuracy(model.predict(X_te), y_te), model


def classification_report(feature_root: str | Path, concepts: Sequence[str], out_dir: str | Path, *,
                          trials: int | None = None, seed: int = 0, layers: Sequence[int] | None = None,
                          components: int = DEFAULT_COMPONENTS, progress: bool = True) -> list[ReportRow]:
    """Fit and score every probe of VARIANTS on every concept; write OUT/classification.csv and .png.

    `trials`: RFM search trials per layer (and per class for per-class M); the aggregation model gets 3x
    (the paper: 300 vs 100). `components`: top AGOP eigenvectors per layer for the aggregation model."""
    from .rfm import SearchConfig, fit_aggregated

    if components < 1:
        raise ValueError(f"components must be >= 1, got {components}")
    search = SearchConfig(seed=seed, **({"trials": trials} if trials else {}))
    rows: list[ReportRow] = []
    for concept in concepts:
        fs = load_features(Path(feature_root) / concept, layers=layers)
        regression = concept in REGRESSION_CONCEPTS
        if regression:
            y = torch.tensor(fs.targets, dtype=torch.float64)
        else:
            lookup = {c: i for i, c in enumerate(fs.classes)}
            y = torch.tensor([lookup[label] for label in fs.labels])
        tr, va, te = split_indices(fs.labels, seed)
        metric = "r2" if regression else "accuracy"
        shared_probes: list = [None] * len(fs.layers)  # the shared-M row's layer probes, for the aggregation
        for method, pooling, name in VARIANTS:
            if regression and method in ("rfm-per-class", "rfm-aggregated"):
                continue
            if method == "rfm-aggregated":
                X = [fs.features["mean"][:, j] for j in range(len(fs.layers))]
                try:
                    agg = fit_aggregated([x[tr] for x in X], y[tr], [x[va] for x in X], y[va], len(fs.classes),
                                         search, components=components, layer_probes=shared_probes)
                except (ProbeFailure, ValueError) as exc:
                    tqdm.write(f"warning: {concept}: {name}: no probe ({exc})", file=sys.stderr)
                    continue
                rows.append(ReportRow(concept, name, metric, None, agg.val_accuracy,
                                      _accuracy(agg.predict([x[te] for x in X]), y[te]), agg.val_auc))
                continue
            best = None
            for j, layer in enumerate(tqdm(fs.layers, desc=f"{concept}: {name}", disable=not progress)):
                X = fs.features[pooling][:, j]
                try:
                    val, val_auc, test, model = _fit_and_score(method, regression, X[tr], y[tr], X[va], y[va], X[te],
                                                               y[te], len(fs.classes), search)
                except ProbeFailure as exc:
                    tqdm.write(f"warning: {concept}: {name}: layer {layer} skipped: no probe ({exc})", file=sys.stderr)
                    continue
                if name == SHARED and not regression:
                    shared_probes[j] = model
                if best is None or val > best[1]:
                    best = (layer, val, test, val_auc)
            if best is None:
                raise ProbeFailure(f"{concept}: {name}: no probe could be fitted at any layer")
            layer, val, test, val_auc = best
            rows.append(ReportRow(concept, name, metric, layer, val, test, val_auc))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_report_csv(rows, out_dir / "classification.csv")
    _plot(rows, out_dir / "classification.png")
    return rows


def write_report_csv(rows: Sequence[ReportRow], path: Path) -> None:
    """CSV_COLUMNS, one line per row: best_layer "all" for the aggregated probe, val_auc empty for R^2 rows."""
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(CSV_COLUMNS)
        for r in rows:
            w.writerow([r.concept, r.probe, r.metric, "all" if r.best_layer is None else r.best_layer,
                        f"{r.val:.4f}", "" if math.isnan(r.val_auc) else f"{r.val_auc:.4f}", f"{r.test:.4f}"])


def classification_figure(rows: list[ReportRow]):
    """The grouped bar chart `_plot` saves (None without matplotlib): test score per concept and probe."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    concepts = list(dict.fromkeys(r.concept for r in rows))
    probes = [v[2] for v in VARIANTS]
    fig, ax = plt.subplots(figsize=(max(5, 2.0 * len(concepts)) + 2.6, 3.5), dpi=120)
    width = 0.8 / len(probes)
    for k, probe in enumerate(probes):
        xs = [i + (k - (len(probes) - 1) / 2) * width for i in range(len(concepts))]
        found = [next((r for r in rows if r.concept == c and r.probe == probe), None) for c in concepts]
        bars = ax.bar(xs, [float("nan") if r is None else r.test for r in found], width, label=probe)
        # Which layer each bar's probe was read at (the best by validation; the aggregated probe reads all).
        ax.bar_label(bars, labels=["" if r is None else "all" if r.best_layer is None else f"L{r.best_layer}"
                                   for r in found], fontsize=6, padding=1)
    ax.set_xticks(range(len(concepts)), concepts)
    # R^2 is named only for the concepts scored by it (tempo's regression), when the report has one.
    regressions = list(dict.fromkeys(r.concept for r in rows if r.metric == "r2"))
    ax.set_ylabel("test accuracy" + (f" (R$^2$ for {', '.join(regressions)})" if regressions else ""))
    ax.set_ylim(0, 1.08)  # room for the layer labels above bars that reach 1
    ax.set_title("probes on held-out test data (label: layer, best by validation)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    # Outside the axes: bars reach the top of the scale, and a legend inside would cover them.
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=8)
    fig.tight_layout()
    return fig


def _plot(rows: list[ReportRow], path: Path) -> None:
    fig = classification_figure(rows)
    if fig is None:
        return
    import matplotlib.pyplot as plt

    fig.savefig(path)
    plt.close(fig)
