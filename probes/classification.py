"""`musicrfm report`: the probes' classification report, the paper's Table 1 protocol on extracted features:
how well each concept can be read off MusicGen (not how steered audio sounds: that is evaluation/).

Per concept and probe (RFM on mean-pooled features, RFM on the last position, linear probe on mean-pooled
features): on the same seeded stratified 70/15/15 split as `train`, a multiclass probe per layer (a
regression for tempo), the layer with the best validation score kept, and its score on the held-out test
part reported: accuracy, or R^2 for tempo. Writes a CSV and a grouped bar chart. A layer where no probe can
be fitted (rfm.ProbeFailure) is reported on stderr and skipped.
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from .extract import load_features
from .rfm import ProbeFailure
from .train import REGRESSION_CONCEPTS, split_indices

VARIANTS = (("rfm", "mean", "RFM, mean-pooled"), ("rfm", "last", "RFM, last position"),
            ("linear", "mean", "linear probe, mean-pooled"))


@dataclass(frozen=True)
class ReportRow:
    concept: str
    probe: str
    metric: str  # "accuracy" or "r2"
    best_layer: int
    val: float
    test: float


def _r2(pred: torch.Tensor, y: torch.Tensor) -> float:
    y = y.double()
    return float(1 - (pred.double() - y).square().sum() / (y - y.mean()).square().sum())


def _fit_and_score(method: str, regression: bool, X_tr, y_tr, X_val, y_val, X_te, y_te, num_classes, search):
    """(validation score, test score) of one probe on one layer."""
    from . import baselines, rfm

    if regression:
        model = (rfm.fit_regression(X_tr, y_tr, X_val, y_val, search) if method == "rfm"
                 else baselines.fit_linear_regression(X_tr, y_tr, X_val, y_val))
        return _r2(model.predict(X_val), y_val), _r2(model.predict(X_te), y_te)
    model = (rfm.fit_multiclass(X_tr, y_tr, X_val, y_val, num_classes, search) if method == "rfm"
             else baselines.fit_linear_multiclass(X_tr, y_tr, X_val, y_val, num_classes))
    return model.val_accuracy, float((model.predict(X_te).cpu() == y_te).float().mean())


def classification_report(feature_root: str | Path, concepts: Sequence[str], out_dir: str | Path, *,
                          trials: int | None = None, seed: int = 0, layers: Sequence[int] | None = None,
                          progress: bool = True) -> list[ReportRow]:
    from .rfm import SearchConfig

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
        for method, pooling, name in VARIANTS:
            best = None
            for j, layer in enumerate(tqdm(fs.layers, desc=f"{concept}: {name}", disable=not progress)):
                X = fs.features[pooling][:, j]
                try:
                    val, test = _fit_and_score(method, regression, X[tr], y[tr], X[va], y[va], X[te], y[te],
                                               len(fs.classes), search)
                except ProbeFailure as exc:
                    tqdm.write(f"warning: {concept}: {name}: layer {layer} skipped: no probe ({exc})", file=sys.stderr)
                    continue
                if best is None or val > best[1]:
                    best = (layer, val, test)
            if best is None:
                raise ProbeFailure(f"{concept}: {name}: no probe could be fitted at any layer")
            rows.append(ReportRow(concept, name, "r2" if regression else "accuracy", *best))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "classification.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["concept", "probe", "metric", "best_layer", "validation", "test"])
        for r in rows:
            w.writerow([r.concept, r.probe, r.metric, r.best_layer, f"{r.val:.4f}", f"{r.test:.4f}"])
    _plot(rows, out_dir / "classification.png")
    return rows


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
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(concepts)) + 2.2, 3.5), dpi=120)
    width = 0.8 / len(probes)
    for k, probe in enumerate(probes):
        xs = [i + (k - (len(probes) - 1) / 2) * width for i in range(len(concepts))]
        ys = [next((r.test for r in rows if r.concept == c and r.probe == probe), float("nan")) for c in concepts]
        ax.bar(xs, ys, width, label=probe)
    ax.set_xticks(range(len(concepts)), concepts)
    # R^2 is named only for the concepts scored by it (tempo's regression), when the report has one.
    regressions = list(dict.fromkeys(r.concept for r in rows if r.metric == "r2"))
    ax.set_ylabel("test accuracy" + (f" (R$^2$ for {', '.join(regressions)})" if regressions else ""))
    ax.set_ylim(0, 1)
    ax.set_title("probes on held-out test data (best layer by validation)")
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
