"""Per-layer probes on extracted features -> a DirectionBank the engine loads.

For each layer (one at a time, so memory holds one layer's features): a seeded, stratified 70/15/15
split (the test part is left for the classification report), one-vs-rest probes for every class, and
per class the unit direction (RFM: signed top AGOP eigenvector; baselines: the probe's weight vector)
with its validation AUC. Tempo is a regression: one direction, "+" raises the BPM, scored by R^2.

Each finished layer is written to `parts/` at once, so a run resumes where it stopped and layers can be
trained on different machines (`--layers 0-23` here, `--layers 24-47` there, then any run assembles the
bank once every layer is present).

A layer where no probe can be fitted (every trial of the RFM search failed numerically, or the features
are degenerate: `rfm.ProbeFailure`) does not stop the run. It is reported (a warning line naming the layer
and the reason) and left out of the bank's layer weighting: a bank needs a unit vector at every layer, so
the layer keeps a fallback direction, the difference of class means (for tempo: the covariance of the
features with the BPM) or, where that is zero too, the nearest probed layer's direction, with its score
set to chance (AUC 0.5, R^2 0), and the scores CSV (`status`, `note`) and the bank's metadata
(`fallback_layers`) say which layers and why. If no layer at all can be probed, no bank is written.

Invariance (`TrainSettings.invariant_to`, `musicrfm train --invariant-to COLUMN --data DIR`): directions that
must not encode a nuisance attribute, e.g. chord quality without the chord's root. The column of the data's
info.csv (matched to the features by clip file name) is a second label. (a) The training and validation parts
are balanced: every (class, nuisance value) cell is cut to the same number of clips, so no class is more often
one root than another. (b) Per layer, the span of the per-value means of the balanced training features (for
roots: one mean per pitch class, centred; rank <= values - 1) is projected out of every feature vector before
the probe is fitted, and once more out of the fitted directions: each direction is orthogonal to that span, so
adding it cannot move the features toward one root. The bank's metadata records it (`invariance`).
"""

from __future__ import annotations

import csv
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from musicrfm.engine.bank import DirectionBank, Provenance
from musicrfm.engine.model import pick_device

from .extract import FeatureError, load_features, load_layer_norms
from .rfm import ProbeFailure

METHODS = ("rfm", "linear", "diffmeans")
LAYER_CHOICES = ("none", "clustering")  # "clustering": k-means ARI/NMI per layer picks one (probes.clustering)
REGRESSION_CONCEPTS = ("tempos",)
RFM_METRICS = ("shared", "per-class")
# The score a fallback layer gets: what a probe that reads nothing scores.
CHANCE_SCORE = {"auc": 0.5, "r2": 0.0}
# The scores CSV's score column per bank score_name (until issue 14 it was the bare score_name: "auc", "r2").
SCORE_COLUMNS = {"auc": "val_auc", "r2": "val_r2"}
_SCORE_WORDS = {"auc": "AUC", "r2": "R^2"}
_LAYER_KEY = "musicrfm.layer"  # a part's metadata entry: {"status": "ok"} or {"status": "fallback", "reason": ...}


@dataclass(frozen=True)
class TrainSettings:
    method: str = "rfm"
    pooling: str = "mean"
    trials: int | None = None  # RFM search trials (None: the search's default, the paper's 100)
    seed: int = 0  # split and search seed
    layers: Sequence[int] | None = None  # None: every extracted layer
    device: str = "auto"
    layer_choice: str = "none"  # "clustering": score each layer by k-means ARI/NMI and record the chosen one
    invariant_to: str | None = None  # an info.csv column the directions must not encode (e.g. root_note_name)
    data: str | None = None  # the data set root holding <concept>/info.csv (needed with invariant_to)
    # RFM only: "shared" (one search per layer, M from the AGOP summed over classes) or "per-class" (the
    # paper's: one binary RFM per class with its own M). Either way a class's direction is the signed top
    # eigenvector of its own uncentred AGOP at its kept fit.
    rfm_metric: str = "shared"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.layer_choice not in LAYER_CHOICES:
            raise ValueError(f"unknown layer choice {self.layer_choice!r}; choose one of {', '.join(LAYER_CHOICES)}")
        if self.rfm_metric not in RFM_METRICS:
            raise ValueError(f"rfm_metric must be one of {', '.join(RFM_METRICS)}, got {self.rfm_metric!r}")
        if self.rfm_metric != "shared" and self.method != "rfm":
            raise ValueError(f"rfm_metric {self.rfm_metric!r} is an RFM option; method is {self.method!r}")
        if self.pooling not in ("mean", "last"):
            raise ValueError(f"pooling must be 'mean' or 'last', got {self.pooling!r}")
        if self.trials is not None and self.trials < 1:
            raise ValueError(f"trials must be >= 1, got {self.trials}")
        if self.invariant_to is not None and not self.data:
            raise ValueError(f"--invariant-to {self.invariant_to} needs --data (the data set whose info.csv holds "
                             "that column)")
        if self.data and self.invariant_to is None:
            raise ValueError("--data is only read with --invariant-to COLUMN")


def split_indices(labels: Sequence[str], seed: int, fractions=(0.7, 0.15, 0.15)) -> tuple[list[int], ...]:
    """Stratified train / validation / test indices, deterministic for the seed. Every class with at least
    three clips has one in each part (probes need positives in validation; the report needs them in test)."""
    gen = torch.Generator().manual_seed(seed)
    parts: tuple[list[int], list[int], list[int]] = ([], [], [])
    by_class: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    for label in sorted(by_class):
        idx = by_class[label]
        idx = [idx[j] for j in torch.randperm(len(idx), generator=gen).tolist()]
        n = len(idx)
        n_val = max(1, round(fractions[1] * n)) if n >= 3 else 0
        n_test = max(1, round(fractions[2] * n)) if n >= 3 else 0
        parts[1].extend(idx[:n_val])
        parts[2].extend(idx[n_val:n_val + n_test])
        parts[0].extend(idx[n_val + n_test:])
    return tuple(sorted(p) for p in parts)


@dataclass
class TrainResult:
    concept: str
    provenance: Provenance  # the method and what `scores` measure, as the bank records them
    classes: list[str]
    layers: list[int]
    scores: torch.Tensor  # [C, L'] validation score per class and trained layer
    bank_path: Path | None  # None until every layer of the model is trained
    csv_path: Path
    plot_path: Path | None
    missing_layers: list[int]
    fallback_layers: dict[int, str] = field(default_factory=dict)  # layer -> why no probe was fitted there
    layer_choice: dict | None = None  # --layer-choice clustering: the bank's metadata["layer_choice"]

    def summary(self) -> str:
        best = self.scores.mean(0)
        top = int(best.argmax())
        p = self.provenance
        text = (f"{self.concept} [{p.method}]: {len(self.classes)} classes x {len(self.layers)} layers; best layer "
                f"{self.layers[top]} (mean validation {_SCORE_WORDS.get(p.score_name, p.score_name)} "
                f"{float(best[top]):.3f}); scores in {self.csv_path}")
        if self.fallback_layers:
            text += (f"; no probe at layers {sorted(self.fallback_layers)} (fallback directions at chance score, "
                     "reasons in the CSV)")
        if self.layer_choice is not None:
            lc = self.layer_choice
            text += (f"; clustering layer choice: layer {lc['layer']} (k-means ARI {lc['ari'][str(lc['layer'])]:.3f}, "
                     f"NMI {lc['nmi'][str(lc['layer'])]:.3f})")
        if self.bank_path is not None:
            return text + f"; bank {self.bank_path}"
        return text + f"; bank not written yet: layers {self.missing_layers} still to train"


def nuisance_labels(data_root: str | Path, concept: str, column: str, stems: Sequence[str]) -> list[str]:
    """The info.csv `column` of each feature row, matched by clip file name (the features keep the clips' stems)."""
    from .dataset import load_concept

    data = load_concept(data_root, concept, check_files=False)
    if column not in data.rows[0]:
        raise ValueError(f"{data.info_csv} has no column {column!r} (it has {', '.join(data.rows[0])})")
    by_stem = {path.stem: row[column].strip() for path, row in zip(data.paths, data.rows)}
    missing = [s for s in stems if s not in by_stem]
    if missing:
        raise FeatureError(f"{data.info_csv}: {len(missing)} feature clip(s) not listed, e.g. {missing[0]!r}; "
                           "--data must be the data set the features were extracted from")
    return [by_stem[s] for s in stems]


def balance_cells(indices: Sequence[int], labels: Sequence[str], nuisance: Sequence[str]) -> list[int]:
    """`indices` cut so that every (label, nuisance value) cell holds the same number of clips, the smallest
    cell's (the first ones of each cell in index order; the split is already shuffled). An empty cell is an
    error: a class seen without some value cannot be balanced."""
    cells: dict[tuple[str, str], list[int]] = {}
    for i in indices:
        cells.setdefault((labels[i], nuisance[i]), []).append(i)
    classes = sorted({labels[i] for i in indices})
    values = sorted({nuisance[i] for i in indices})
    empty = [(c, v) for c in classes for v in values if (c, v) not in cells]
    if empty:
        c, v = empty[0]
        raise ValueError(f"cannot balance: class {c!r} has no clip with value {v!r} in this part "
                         f"({len(empty)} empty cell(s)); the classes must each cover every value")
    per_cell = min(len(v) for v in cells.values())
    return sorted(i for cell in cells.values() for i in cell[:per_cell])


def nuisance_basis(X: torch.Tensor, nuisance: Sequence[str], tolerance: float = 1e-6) -> torch.Tensor:
    """Orthonormal basis [d, r] (float64) of the span of the per-value means of X [n, d] about the grand mean:
    the subspace along which the nuisance (e.g. the root) moves the features. r <= values - 1; directions
    with singular values below `tolerance` x the largest are dropped (they hold rounding, not a value)."""
    X = X.double()
    values = sorted(set(nuisance))
    index = torch.tensor([values.index(v) for v in nuisance])
    means = torch.stack([X[index == k].mean(0) for k in range(len(values))]) - X.mean(0)
    U, S, _ = torch.linalg.svd(means.T, full_matrices=False)
    if not bool((S > 0).any()):
        return U[:, :0]
    return U[:, S > tolerance * S[0]]


def remove_span(X: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """X (rows) with its components in the span of `basis` [d, r] removed (float32 for half-precision X, whose
    rounding would put a trace of the span back)."""
    B = basis.to(X.device, torch.float64)
    Xd = X.double()
    return (Xd - (Xd @ B) @ B.T).to(torch.promote_types(X.dtype, torch.float32))


def _fit_layer(method: str, regression: bool, X_tr, y_tr, X_val, y_val, num_classes: int, search,
               shared_metric: bool = True):
    """(directions [C, d], validation scores [C]) for one layer."""
    from . import baselines, rfm

    if regression:
        if method != "rfm":
            raise ValueError(f"method {method!r} has no regression form; tempo probes use --method rfm")
        reg = rfm.fit_regression(X_tr, y_tr, X_val, y_val, search)
        return reg.direction[None], torch.tensor([reg.val_r2])
    if method == "rfm":
        results = rfm.fit_binary_directions(X_tr, y_tr, X_val, y_val, num_classes, search, shared_metric=shared_metric)
    elif method == "linear":
        results = baselines.fit_linear_directions(X_tr, y_tr, X_val, y_val, num_classes)
    else:
        results = baselines.fit_mean_difference(X_tr, y_tr, X_val, y_val, num_classes)
    return torch.stack([r.direction for r in results]), torch.tensor([r.val_auc for r in results])


def _fallback_directions(regression: bool, X_tr, y_tr, num_classes: int) -> torch.Tensor:
    """[C, d] unit directions of a layer without a probe: class mean minus the mean of the other classes'
    points (tempo: the covariance of the features with the BPM, + faster); a zero row where that is zero."""
    X = X_tr.double()
    if regression:
        y = y_tr.double()
        v = ((X - X.mean(0)).T @ (y - y.mean()))[None]
    else:
        onehot = torch.nn.functional.one_hot(y_tr.long(), num_classes).double()  # every class has a point
        counts = onehot.sum(0)
        class_sums = onehot.T @ X
        rest = (X.shape[0] - counts).clamp_min(1)[:, None]
        v = class_sums / counts[:, None] - (X.sum(0) - class_sums) / rest
    norms = v.norm(dim=1, keepdim=True)
    return torch.where(norms > 0, v / norms.clamp_min(1e-300), torch.zeros_like(v)).float()


def _fallback_kind(regression: bool, some_zero: bool) -> str:
    """What a fallback layer's vectors are, in words (the CSV, the bank's metadata, the warning)."""
    kind = "the covariance of the features with the target" if regression else "the difference of class means"
    return kind + (" (the nearest probed layer's direction where that is zero)" if some_zero else "")


def _fill_from_nearest(D: torch.Tensor, layers: list[int], probed: set[int]) -> None:
    """Zero rows of D [C, L', d] (fallback layers whose class means coincide) take the direction of the
    nearest probed layer (ties: the lower one), in place."""
    for j, layer in enumerate(layers):
        zero = D[:, j].norm(dim=1) == 0
        if bool(zero.any()) and probed:
            source = min(probed, key=lambda k: (abs(k - layer), k))
            D[zero, j] = D[zero, layers.index(source)]


def train_concept(feature_dir: str | Path, out_dir: str | Path, settings: TrainSettings = TrainSettings(),
                  progress: bool = True) -> TrainResult:
    from .rfm import SearchConfig

    feature_dir, out_dir = Path(feature_dir), Path(out_dir)
    head = load_features(feature_dir, poolings=[])  # labels and layers only
    concept = head.concept
    regression = concept in REGRESSION_CONCEPTS
    layers = list(settings.layers) if settings.layers is not None else head.layers
    missing = [i for i in layers if i not in head.layers]
    if missing:
        raise FeatureError(f"{feature_dir}: layers {missing} were not extracted (have {head.layers})")
    clustering = settings.layer_choice == "clustering"
    if regression and clustering:
        raise ValueError(f"--layer-choice clustering needs classes to cluster; {concept} is a regression concept")
    if regression:
        if head.targets is None:
            raise FeatureError(f"{feature_dir}: {concept} needs numeric targets (BPM) in its index")
        classes, y_all = ["faster"], torch.tensor(head.targets, dtype=torch.float64)
    else:
        classes = head.classes
        lookup = {c: i for i, c in enumerate(classes)}
        y_all = torch.tensor([lookup[label] for label in head.labels])
    train_idx, val_idx, _ = split_indices(head.labels, settings.seed)
    invariance = None
    if settings.invariant_to is not None:
        if regression:
            raise ValueError(f"--invariant-to applies to classification concepts; {concept} is a regression")
        nuisance = nuisance_labels(settings.data, concept, settings.invariant_to, head.stems)
        # stratified by (class, value), so that every cell reaches validation
        train_idx, val_idx, _ = split_indices([f"{a}\x1f{b}" for a, b in zip(head.labels, nuisance)], settings.seed)
        train_idx = balance_cells(train_idx, head.labels, nuisance)
        val_idx = balance_cells(val_idx, head.labels, nuisance)
        invariance = {"column": settings.invariant_to, "values": len(set(nuisance)),
                      "balanced": {"train": len(train_idx), "validation": len(val_idx),
                                   "per_cell_train": len(train_idx) // (len(classes) * len(set(nuisance)))},
                      "removed": "the span of the per-value means of the balanced training features, per layer, "
                                 "from the features before fitting and from the directions after"}
    device = pick_device(settings.device)
    search = SearchConfig(seed=settings.seed, device=device.type,
                          **({"trials": settings.trials} if settings.trials else {}))
    name = (f"{concept}.{settings.method}" + ("" if settings.rfm_metric == "shared" else f".{settings.rfm_metric}")
            + ("" if settings.pooling == "mean" else f".{settings.pooling}")
            + (f".invariant-{settings.invariant_to}" if settings.invariant_to else ""))
    parts = out_dir / "parts" / name
    parts.mkdir(parents=True, exist_ok=True)
    meta = {"concept": concept, "fingerprint": head.fingerprint.to_dict(), "classes": classes,
            # rfm_metric only when it is not the default, so parts trained before the option still resume
            "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items()
                         # options only when used: parts trained before they existed still resume
                         if k != "layers" and not (k == "layer_choice" and v == "none")
                         and not (k in ("invariant_to", "data") and v is None)
                         and not (k == "rfm_metric" and v == "shared")},
            "prompt": head.prompt, "search": asdict(search) if settings.method == "rfm" else None,
            **({"invariance": invariance} if invariance else {})}
    meta = json.loads(json.dumps(meta))  # as a part stores it (tuples become lists), so a resumed run compares equal

    for layer in tqdm(layers, desc=f"train {name}", unit="layer", disable=not progress):
        path = parts / f"layer-{layer:03d}.safetensors"
        if path.exists():
            with safe_open(str(path), framework="pt") as f:
                if json.loads(f.metadata()["musicrfm"]) != meta:
                    raise FeatureError(f"{path}: trained with other settings or data; remove {parts} to retrain")
            continue
        X = load_features(feature_dir, head.fingerprint, layers=[layer], poolings=[settings.pooling])
        X = X.features[settings.pooling][:, 0]
        status = {"status": "ok"}
        basis = None
        if invariance is not None:
            basis = nuisance_basis(X[train_idx], [nuisance[i] for i in train_idx])
            X = remove_span(X, basis)
            status["removed_dims"] = int(basis.shape[1])
        try:
            directions, scores = _fit_layer(settings.method, regression, X[train_idx], y_all[train_idx], X[val_idx],
                                            y_all[val_idx], len(classes), search, settings.rfm_metric == "shared")
        except ProbeFailure as exc:
            chance = CHANCE_SCORE["r2" if regression else "auc"]
            directions = _fallback_directions(regression, X[train_idx], y_all[train_idx], len(classes))
            scores = torch.full((len(classes),), chance)
            status = {"status": "fallback", "reason": str(exc),
                      "direction": _fallback_kind(regression, bool((directions.norm(dim=1) == 0).any()))}
            tqdm.write(f"warning: {name} layer {layer}: no probe ({exc}); left out: the bank keeps "
                       f"{status['direction']} there, scored at chance ({chance}) so layer weighting by score "
                       "ignores it", file=sys.stderr)
        if basis is not None:  # exactly orthogonal (RFM works in its own basis; rounding leaves a trace)
            directions = remove_span(directions.double(), basis)
            directions = directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-300)
        tensors = {"directions": directions.float().contiguous(), "scores": scores.float()}
        if clustering:  # unsupervised: k-means on the training split, its clusters scored against the labels
            from .clustering import cluster_layer

            found = cluster_layer(layer, X[train_idx], y_all[train_idx], len(classes), seed=settings.seed)
            tensors["clustering"] = torch.tensor([found.ari, found.nmi], dtype=torch.float64)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp),
                  metadata={"musicrfm": json.dumps(meta), _LAYER_KEY: json.dumps(status)})
        os.replace(tmp, path)

    # Everything trained so far (this run or others), in layer order.
    done = sorted(int(p.stem.split("-")[1]) for p in parts.glob("layer-*.safetensors"))
    dirs, scores, fallback, kinds, cluster_scores, removed = [], [], {}, {}, {}, {}
    for layer in done:
        with safe_open(str(parts / f"layer-{layer:03d}.safetensors"), framework="pt") as f:
            dirs.append(f.get_tensor("directions"))
            scores.append(f.get_tensor("scores"))
            if clustering:
                cluster_scores[layer] = [float(v) for v in f.get_tensor("clustering")]
            status = json.loads((f.metadata() or {}).get(_LAYER_KEY, '{"status": "ok"}'))
        if "removed_dims" in status:
            removed[layer] = status["removed_dims"]
        if status["status"] != "ok":
            fallback[layer] = status.get("reason", "no probe")
            kinds[layer] = status.get("direction", "a fallback direction")
    D, S = torch.stack(dirs, 1), torch.stack(scores, 1)  # [C, L', d], [C, L']
    _fill_from_nearest(D, done, {k for k in done if k not in fallback})
    provenance = Provenance(settings.method, "r2" if regression else "auc")
    score_name = provenance.score_name
    notes = {layer: f"no probe: {reason}; direction: {kinds[layer]}; score: chance ({CHANCE_SCORE[score_name]})"
             for layer, reason in fallback.items()}
    csv_path = out_dir / f"{name}.scores.csv"
    with csv_path.open("w", newline="") as fh:
        w = csv.writer(fh)
        # The scores are validation scores (the split's 15 %), named so: the test part is the report's. With
        # --layer-choice clustering the layer's k-means ARI and NMI follow (the same on each class's row).
        w.writerow(["layer", "class", SCORE_COLUMNS[score_name], "status", "note"] + (["ari", "nmi"] if clustering else []))
        for j, layer in enumerate(done):
            for c, cls in enumerate(classes):
                w.writerow([layer, cls, f"{float(S[c, j]):.6f}", "fallback" if layer in fallback else "ok",
                            notes.get(layer, "")] + [f"{v:.6f}" for v in cluster_scores.get(layer, [])])
    plot_path = _plot_scores(out_dir / f"{name}.scores.png", concept, provenance, done, S)
    all_layers = list(range(head.fingerprint.num_layers))
    missing_layers = [i for i in all_layers if i not in done]
    bank_path = None
    if not missing_layers and len(fallback) == len(done):
        raise ProbeFailure(f"{name}: no probe could be fitted at any layer (reasons in {csv_path}); no bank written")
    fallback_meta = {"fallback_layers": [{"layer": k, "reason": fallback[k], "direction": kinds[k]} for k in fallback]}
    choice_meta = {}
    if clustering:
        from .clustering import CHOICE_INDEX, LayerClustering, choose_layer

        # A layer without a probe (fallback) is not a place to steer with this bank's method.
        candidates = [LayerClustering(k, *v) for k, v in cluster_scores.items() if k not in fallback]
        chosen = choose_layer(candidates or [LayerClustering(k, *v) for k, v in cluster_scores.items()])
        choice_meta = {"layer_choice": {"method": "clustering", "index": CHOICE_INDEX, "layer": chosen.layer,
                                        "k": len(classes), "ari": {str(k): v[0] for k, v in cluster_scores.items()},
                                        "nmi": {str(k): v[1] for k, v in cluster_scores.items()}}}
    if not missing_layers:
        bank = DirectionBank.from_arrays(
            concept, classes, D, S, head.fingerprint, method=provenance.method, pooling=settings.pooling,
            score_name=provenance.score_name, injection_point=head.site,
            metadata={"prompt": head.prompt, "split": "stratified 70/15/15", "seed": settings.seed,
                      "scores": f"validation {_SCORE_WORDS[score_name]} (the split's validation part)",
                      **({"rfm_metric": settings.rfm_metric} if settings.method == "rfm" else {}),
                      "search": meta["search"], "features": str(feature_dir), **(fallback_meta if fallback else {}),
                      **choice_meta,
                      **({"invariance": {**invariance, "removed_dims": [removed[k] for k in done]}}
                         if invariance else {})},
            layer_norms=load_layer_norms(feature_dir, head.fingerprint.num_layers),
        )
        bank_path = out_dir / f"{name}.safetensors"
        bank.save(bank_path)
    return TrainResult(concept, provenance, classes, done, S, bank_path, csv_path, plot_path, missing_layers, fallback,
                       choice_meta.get("layer_choice"))


def scores_figure(concept: str, provenance: Provenance, layers: list[int], scores: torch.Tensor):
    """The figure `_plot_scores` saves (None without matplotlib): where the concept lives, by layer."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:  # plots are a convenience; the CSV holds the same numbers
        return None
    s = scores.float()
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=120)
    ax.plot(layers, s.mean(0), marker="o", ms=3, label=f"mean over {s.shape[0]} classes")
    if s.shape[0] > 1:
        ax.fill_between(layers, s.min(0).values, s.max(0).values, alpha=0.25, label="min-max over classes")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers: no "layer 0.5"
    ax.set_xlabel("decoder layer (residual stream after the block)")
    ax.set_ylabel(f"validation {dict(auc='AUC', r2='R$^2$').get(provenance.score_name, provenance.score_name)}")
    ax.set_title(f"{concept}: {provenance.method} probes per layer")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", framealpha=0.85, fontsize=8)  # where it hides the least of the curve
    fig.tight_layout()
    return fig


def _plot_scores(path: Path, concept: str, provenance: Provenance, layers: list[int],
                 scores: torch.Tensor) -> Path | None:
    """Per-layer score: mean over classes with the min-max band (a picture of where the concept lives)."""
    fig = scores_figure(concept, provenance, layers, scores)
    if fig is None:
        return None
    import matplotlib.pyplot as plt

    fig.savefig(path)
    plt.close(fig)
    return path
