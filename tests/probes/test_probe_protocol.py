"""The paper's probe protocol beside ours (issue 14 item 4): per-class binary RFM with its own M, and the
multi-layer aggregation probe, on planted problems (CPU, a few seconds in all)."""

import pytest
import torch

from musicrfm.probes.rfm import (
    AggregatedClassifier,
    PredictorStack,
    SearchConfig,
    fit_aggregated,
    fit_binary_directions,
    fit_multiclass,
    roc_auc,
)

# One fixed configuration run for a few iterations: the kept fit is a learned M, not the first (M = I) one.
FIXED = SearchConfig(trials=1, iterations=3, halving=1, patience=None, bandwidth_range=(20.0, 20.0),
                     reg_range=(1e-3, 1e-3), exponent_range=(1.0, 1.0), center_grads=(False,))
TINY = SearchConfig(trials=3, iterations=2, seed=0)


def classes_in_own_subspaces(n: int, d: int = 48, classes: int = 3, seed: int = 0):
    """Class c is read off its own direction u_c, as |x . u_c| (an even function: only a learned M sees it
    well, and the first fit, M = I, poorly: val AUC ~0.7); the other coordinates are isotropic noise.
    Returns X [n, d], labels [n], U [classes, d]."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(d, classes, generator=g))[0].T  # orthonormal rows
    labels = torch.arange(n) % classes
    X = torch.randn(n, d, generator=g)
    X -= (X @ U.T) @ U  # the class directions carry only the signal
    sign = torch.randint(0, 2, (n,), generator=g) * 2 - 1
    X += (sign * (1.5 + 0.3 * torch.randn(n, generator=g)))[:, None] * U[labels]
    X += 0.3 * torch.randn(n, classes, generator=g) @ U  # small spread along every class direction
    return X + 2.0, labels, U


def test_per_class_metric_differs_per_class_and_each_probe_separates_its_class():
    X, y, U = classes_in_own_subspaces(900)
    X_tr, y_tr, X_val, y_val, X_te, y_te = X[:500], y[:500], X[500:700], y[500:700], X[700:], y[700:]
    per_class = fit_binary_directions(X_tr, y_tr, X_val, y_val, 3, FIXED, keep_predictors=True, shared_metric=False)
    tops = []
    for c, r in enumerate(per_class):
        assert r.predictor.metric is not None and r.best_iteration > 0  # a learned M was kept
        evals, evecs = torch.linalg.eigh(r.predictor.metric.double())
        tops.append(evecs[:, -1])
        # Its own M looks along its own class direction (kernel coordinates are an isotropic map of X).
        assert abs(float(evecs[:, -1].float() @ U[c])) > 0.9
        assert abs(float(r.direction @ U[c])) > 0.9
        # Each class's own probe separates its class on held-out data (output 0 is that class's score).
        assert float(roc_auc(r.predictor.scores(X_te)[:, r.output_index], y_te == c)) > 0.9  # M = I: ~0.7
    for a in range(3):
        for b in range(a + 1, 3):
            assert abs(float(tops[a] @ tops[b])) < 0.3  # three different metrics
    # The shared-M search on the same data learns one M for all classes: every class's predictor holds it.
    shared = fit_binary_directions(X_tr, y_tr, X_val, y_val, 3, FIXED, keep_predictors=True)
    assert all(s.predictor.metric is shared[0].predictor.metric for s in shared)


def test_per_class_multiclass_classifier_is_the_stack_of_binary_probes():
    X, y, _ = classes_in_own_subspaces(900)
    X, y = X[:600], y[:600]
    clf = fit_multiclass(X[:300], y[:300], X[300:450], y[300:450], 3, FIXED, shared_metric=False)
    assert isinstance(clf.predictor, PredictorStack) and not clf.shared_metric
    assert len(clf.predictor.predictors) == 3
    binary = fit_binary_directions(X[:300], y[:300], X[300:450], y[300:450], 3, FIXED, keep_predictors=True,
                                   shared_metric=False)
    # Column c is class c's own binary score: the same fits as fit_binary_directions'.
    expected = torch.stack([b.predictor.scores(X[450:])[:, 0] for b in binary], 1)
    torch.testing.assert_close(clf.predictor.scores(X[450:]), expected)
    assert abs(clf.val_auc - sum(b.val_auc for b in binary) / 3) < 1e-9
    assert float((clf.predict(X[450:]) == y[450:]).float().mean()) > 0.8  # chance 1/3
    assert clf.search_fits == 3 * 4  # three searches of one trial, 4 fits each
    shared = fit_multiclass(X[:300], y[:300], X[300:450], y[300:450], 3, FIXED)
    assert shared.shared_metric and shared.search_fits == 4


def signal_split_across_layers(n: int, seed: int = 0):
    """Four classes = two bits; layer 0 shows only the first bit, layer 1 only the second, each along one
    direction among noise: each layer alone tells two pairs of classes apart (accuracy ~0.5)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    bits = torch.stack([labels // 2, labels % 2], 1).float() * 2 - 1
    layers = []
    for k in range(2):
        X = torch.randn(n, 12, generator=g)
        X[:, k] += 2.5 * bits[:, k]
        layers.append(X)
    return layers, labels


def test_aggregated_probe_beats_the_best_single_layer_when_the_signal_is_split():
    layers, y = signal_split_across_layers(480)
    tr, va, te = slice(0, 240), slice(240, 360), slice(360, 480)
    singles = [fit_multiclass(X[tr], y[tr], X[va], y[va], 4, TINY) for X in layers]
    single_test = [float((p.predict(X[te]) == y[te]).float().mean()) for p, X in zip(singles, layers)]
    agg = fit_aggregated([X[tr] for X in layers], y[tr], [X[va] for X in layers], y[va], 4, TINY, components=2,
                         layer_probes=singles)
    assert isinstance(agg, AggregatedClassifier) and agg.layers == (0, 1)
    assert agg.features([X[te] for X in layers]).shape == (120, 4)  # 2 layers x 2 components
    agg_test = float((agg.predict([X[te] for X in layers]) == y[te]).float().mean())
    assert max(single_test) < 0.65  # one bit of two: about half
    assert agg_test > 0.9 and agg_test >= max(single_test)
    # Without given layer probes it fits its own (same search: the same projections, the same answer).
    again = fit_aggregated([X[tr] for X in layers], y[tr], [X[va] for X in layers], y[va], 4, TINY, components=2)
    assert torch.equal(again.predict([X[te] for X in layers]), agg.predict([X[te] for X in layers]))


def test_aggregated_probe_rejects_bad_input():
    layers, y = signal_split_across_layers(80)
    with pytest.raises(ValueError, match="components"):
        fit_aggregated(layers, y, layers, y, 4, TINY, components=0)
    with pytest.raises(ValueError, match="same number"):
        fit_aggregated(layers, y, layers[:1], y, 4, TINY)
