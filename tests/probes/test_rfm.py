"""RFM probes and linear baselines on planted problems (CPU, a few seconds in all).

A planted problem: features [n, d] where the label depends on a known unit direction u among distractor
dimensions. The probes must find u (|cos| > 0.9) and sign it so that moving along +direction raises the
class score of the fitted predictor.
"""

import itertools
import math

import pytest
import torch

from musicrfm.probes import rfm
from musicrfm.probes.baselines import fit_linear_directions, fit_linear_multiclass, fit_mean_difference
from musicrfm.probes.rfm import (
    DegenerateFeatures,
    FeatureMap,
    ProbeFailure,
    RFMConfig,
    SearchConfig,
    fit_binary_directions,
    fit_multiclass,
    fit_regression,
    roc_auc,
)

N, D = 600, 64
SMALL = SearchConfig(trials=8, iterations=5, seed=0)


def planted(n: int, d: int = D, *, seed: int, kind: str = "sign",
            isotropic: bool | None = None, signal_std: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """X [n, d]: a signal coordinate along u (std 1 by default), distractors elsewhere; labels from x . u.

    "sign": label = [x.u + noise > 0]; by default anisotropic distractors (std 0.5-2, mostly above the signal).
    "abs": label = [|x.u| > 0.7], an even function no linear probe sees; isotropic distractors (std 1).
    """
    g = torch.Generator().manual_seed(seed)
    u = torch.zeros(d)
    u[torch.tensor([3, 10, 17, 40]) % d] = 0.5  # a unit direction that is not a coordinate axis
    isotropic = kind == "abs" if isotropic is None else isotropic
    spread = torch.ones(d) if isotropic else torch.linspace(0.5, 2.0, d)
    X = torch.randn(n, d, generator=g) * spread
    X = X - (X @ u)[:, None] * u + signal_std * torch.randn(n, 1, generator=g) * u  # the signal coordinate
    t = X @ u
    if kind == "sign":  # linear boundary with label noise
        labels = (t + 0.3 * torch.randn(n, generator=g) > 0).long()
    elif kind == "abs":  # non-linear: both tails are the class
        labels = (t.abs() > 0.7).long()
    else:
        raise ValueError(kind)
    return X + 3.0, labels, u  # an offset, as real activations have


def split(kind: str, seed: int = 0):
    X, y, u = planted(N + 300, seed=seed, kind=kind)
    return X[:N], y[:N], X[N:], y[N:], u


def score_change_along(result, X: torch.Tensor, step: float = 0.05) -> float:
    """Mean change of the class score when every point moves by step * direction."""
    f = result.predictor
    c = result.output_index
    return float((f.scores(X + step * result.direction)[:, c] - f.scores(X)[:, c]).mean())


# ---------------------------------------------------------------------------------------------------


def test_linear_planted_direction_recovered_with_sign():
    X, y, Xv, yv, u = split("sign")
    results = fit_binary_directions(X, y, Xv, yv, 2, SMALL, keep_predictors=True)
    assert [r.class_index for r in results] == [0, 1]
    for r in results:
        assert abs(float(r.direction @ u)) > 0.9
        assert r.val_auc > 0.85
        assert math.isclose(float(r.direction.norm()), 1.0, rel_tol=1e-5)
        assert r.sign_margin > 0.5
        # The sign convention on the fitted predictor: +direction raises this class's score (held-out
        # points: at a training point the kernel's cusp at zero distance dominates a finite step) ...
        assert score_change_along(r, Xv) > 0
    # ... which for label = [x . u > 0] means class 1 points along +u and class 0 along -u.
    assert float(results[1].direction @ u) > 0.9
    assert float(results[0].direction @ u) < -0.9


def test_nonlinear_planted_direction_recovered():
    X, y, Xv, yv, u = split("abs")
    results = fit_binary_directions(X, y, Xv, yv, 2, SMALL, keep_predictors=True)
    for r in results:
        assert abs(float(r.direction @ u)) > 0.9
        assert r.val_auc > 0.8
        # Both tails are the class, so the sign is weak by nature; the convention itself (the mean
        # gradient over the training points has a positive component along +direction) must hold.
        assert float((r.predictor.gradients(X, r.output_index) @ r.direction).mean()) > 0


def test_feature_learning_sharpens_the_direction():
    """A fixed config run to several iterations: the AGOP concentrates on u (the RFM mechanism)."""
    X, y, Xv, yv, u = split("abs", seed=1)
    cfg = dict(trials=1, bandwidth_range=(20.0, 20.0), reg_range=(1e-3, 1e-3), exponent_range=(1.0, 1.0),
               center_grads=(False,), patience=None, halving=1)
    first = fit_binary_directions(X, y, Xv, yv, 2, SearchConfig(iterations=0, **cfg))[1]
    learned = fit_binary_directions(X, y, Xv, yv, 2, SearchConfig(iterations=4, **cfg))[1]
    assert learned.best_iteration > 0
    assert learned.val_auc > first.val_auc
    assert learned.explained > first.explained


@pytest.mark.parametrize("n,d,iterations", [(120, 16, 0), (120, 16, 2), (40, 90, 0), (40, 90, 2)])
def test_predictor_gradients_match_finite_differences(n, d, iterations):
    """Analytic gradients in the original space, with and without the d > n basis, M = I and learned M."""
    X, y, u = planted(n + 30, d, seed=2)
    search = SearchConfig(trials=1, iterations=iterations, patience=None, halving=1, seed=3,
                          bandwidth_range=(15.0, 15.0), exponent_range=(1.2, 1.2))
    r = fit_binary_directions(X[:n], y[:n], X[n:], y[n:], 2, search, keep_predictors=True)[1]
    assert r.predictor.iteration == r.best_iteration
    x = X[n:n + 4]
    analytic = r.predictor.gradients(x, r.output_index)
    eps = 1e-2
    for j in (0, 3, d - 1):
        e = torch.zeros(d)
        e[j] = eps
        fd = (r.predictor.scores(x + e) - r.predictor.scores(x - e))[:, r.output_index] / (2 * eps)
        torch.testing.assert_close(analytic[:, j], fd, rtol=2e-2, atol=2e-4)


def test_auc_from_scores_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (50, 3), generator=g).float()  # many ties
    positive = torch.rand(50, 3, generator=g) < 0.4
    got = roc_auc(scores, positive)
    for c in range(3):
        pos, neg = scores[positive[:, c], c], scores[~positive[:, c], c]
        wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p, q in itertools.product(pos, neg))
        assert math.isclose(float(got[c]), wins / (len(pos) * len(neg)), rel_tol=1e-12)
    assert float(roc_auc(torch.ones(10), torch.arange(10) < 4)) == 0.5  # equal scores: chance
    assert math.isnan(float(roc_auc(torch.rand(10), torch.zeros(10, dtype=torch.bool))))  # no positive
    assert float(roc_auc(torch.arange(10.0), torch.arange(10) >= 5)) == 1.0


def test_multiclass_planted_accuracy_well_above_chance():
    g = torch.Generator().manual_seed(4)
    classes, n = 4, 800
    centres = 1.5 * torch.linalg.qr(torch.randn(D, classes, generator=g))[0].T  # [4, d] orthogonal
    labels = torch.arange(n) % classes
    X = torch.randn(n, D, generator=g) + centres[labels]
    X = X * (1 + (X[:, :1] > 0))  # a multiplicative nuisance: not linearly clean
    clf = fit_multiclass(X[:600].half(), labels[:600], X[600:].half(), labels[600:], classes, SMALL)
    assert clf.val_accuracy > 0.6  # chance: 0.25
    proba = clf.predict_proba(X[600:])
    torch.testing.assert_close(proba.sum(1), torch.ones(200))
    assert torch.equal(clf.predict(X[600:]), proba.argmax(1))
    assert math.isclose(float((clf.predict(X[600:]) == labels[600:]).float().mean()), clf.val_accuracy, abs_tol=0.01)


def test_regression_recovers_direction_that_raises_target():
    X, _, u = planted(N + 300, seed=5)
    t = (X - 3.0) @ u
    y = 120.0 + 20.0 * t + 5.0 * t**2 + torch.randn(N + 300, generator=torch.Generator().manual_seed(6))
    reg = fit_regression(X[:N], y[:N], X[N:], y[N:], SMALL)
    assert float(reg.direction @ u) > 0.9  # + raises the target (on average over the data)
    assert reg.val_r2 > 0.8
    assert float((reg.predict(X[N:] + 0.1 * reg.direction) - reg.predict(X[N:])).mean()) > 0
    assert abs(float(reg.predict(X[N:]).mean()) - float(y[N:].mean())) < 5.0  # original units


def test_baselines_recover_linear_direction():
    X, y, u = planted(2300, seed=0)  # linear probes are cheap: more data, less estimation noise
    X, y, Xv, yv = X[:2000], y[:2000], X[2000:], y[2000:]
    for fit in (fit_linear_directions, fit_mean_difference):
        results = fit(X, y, Xv, yv, 2)
        assert float(results[1].direction @ u) > 0.9 and float(results[0].direction @ u) < -0.9
        for r in results:
            assert math.isclose(float(r.direction.norm()), 1.0, rel_tol=1e-5)
            expected = roc_auc(Xv @ r.direction, yv == r.class_index)  # AUC of the linear scores
            assert math.isclose(r.val_auc, float(expected), abs_tol=1e-6)
            assert r.config is None
    clf = fit_linear_multiclass(X, y, Xv, yv, 2)
    assert clf.val_accuracy > 0.8
    torch.testing.assert_close(clf.predict_proba(Xv).sum(1), torch.ones(len(Xv)))


def test_search_respects_budget_and_is_deterministic():
    X, y, Xv, yv, _ = split("sign")
    capped = fit_binary_directions(X, y, Xv, yv, 2, SearchConfig(trials=10, iterations=5, budget=7, seed=1))
    assert capped[0].search_fits == 7
    # Halving arithmetic without early stopping: 9 trials x fits 0-1, then 3 trials x fits 2-3.
    search = SearchConfig(trials=9, iterations=3, patience=None, halving=3, seed=1)
    assert search.rung_ends() == [1, 3]
    a = fit_binary_directions(X, y, Xv, yv, 2, search)
    assert a[0].search_fits == 9 * 2 + 3 * 2
    b = fit_binary_directions(X, y, Xv, yv, 2, search)
    for ra, rb in zip(a, b):
        assert ra.config == rb.config and ra.best_iteration == rb.best_iteration and ra.val_auc == rb.val_auc
        assert torch.equal(ra.direction, rb.direction)
    assert SearchConfig(seed=1).sample() != SearchConfig(seed=2).sample()
    assert SearchConfig(trials=5, seed=1).sample() == SearchConfig(trials=50, seed=1).sample()[:5]
    for cfg in SearchConfig(trials=200).sample():  # the paper's ranges
        assert 1 <= cfg.bandwidth <= 100 and 1e-5 <= cfg.reg <= 10 and 0.7 <= cfg.exponent <= 1.4


def test_degenerate_inputs_work_or_fail_clearly():
    X, y, Xv, yv, u = split("sign")
    X, Xv = X.clone(), Xv.clone()
    X[:, 5] = 7.0  # a constant feature
    Xv[:, 5] = 7.0
    y3 = y.clone()
    y3[0] = 2  # a class with a single training example
    yv3 = yv.clone()
    yv3[:3] = 2
    results = fit_binary_directions(X, y3, Xv, yv3, 3, SMALL)
    for r in results:
        assert torch.isfinite(r.direction).all() and math.isclose(float(r.direction.norm()), 1.0, rel_tol=1e-5)
        assert 0.0 <= r.val_auc <= 1.0
    assert abs(float(results[1].direction @ u)) > 0.9

    with pytest.raises(ValueError, match="no training example"):
        fit_binary_directions(X, y, Xv, yv, 3, SMALL)
    with pytest.raises(ValueError, match="no validation example"):
        fit_binary_directions(X, y3, Xv, yv, 3, SMALL)
    with pytest.raises(ValueError, match="identical"):
        fit_binary_directions(torch.ones(20, 4), y[:20], Xv[:20, :4], yv[:20], 2, SMALL)
    with pytest.raises(ValueError, match="NaN"):
        fit_binary_directions(X.masked_fill(X > 6, float("nan")), y, Xv, yv, 2, SMALL)
    with pytest.raises(ValueError, match="lie in"):
        fit_binary_directions(X, y + 5, Xv, yv, 2, SMALL)
    with pytest.raises(ValueError, match="class indices"):
        fit_binary_directions(X, y.float(), Xv, yv, 2, SMALL)
    with pytest.raises(ValueError, match="features"):
        fit_binary_directions(X, y, Xv[:, :10], yv, 2, SMALL)
    with pytest.raises(ValueError, match="constant"):
        fit_regression(X, torch.ones(N), Xv, torch.ones(len(Xv)), SMALL)
    with pytest.raises(ValueError, match="exponent"):
        RFMConfig(exponent=2.5)

    # Scores all equal (a bandwidth so small that K = I): AUC 0.5, no crash, a unit direction anyway.
    tiny = SearchConfig(trials=2, iterations=3, bandwidth_range=(1e-6, 1e-6), seed=0)
    flat = fit_binary_directions(X, y, Xv, yv, 2, tiny)
    assert all(r.val_auc == 0.5 and math.isclose(float(r.direction.norm()), 1.0, rel_tol=1e-5) for r in flat)


def test_float16_features_match_float32():
    X, y, Xv, yv, u = split("sign")
    half = fit_binary_directions(X.half(), y, Xv.half(), yv, 2, SMALL)
    full = fit_binary_directions(X.half().float(), y, Xv.half().float(), yv, 2, SMALL)
    for h, f in zip(half, full):
        assert h.direction.dtype == torch.float32
        torch.testing.assert_close(h.direction, f.direction)
        assert h.val_auc == f.val_auc


def test_high_dimensional_features_use_the_training_span():
    """d > n: the computation runs in the span of the training points; the direction is still found."""
    X, y, u = planted(200 + 100, 300, seed=7, isotropic=True, signal_std=3.0)
    fmap = FeatureMap.fit(X[:200])
    assert fmap.basis is not None and fmap.dim <= 200
    results = fit_binary_directions(X[:200], y[:200], X[200:], y[200:], 2, SMALL)
    assert abs(float(results[1].direction @ u)) > 0.8
    assert results[1].direction.shape == (300,)


# ---------------------------------------------------------------------------------------------------
# Numerical robustness (issue 14): near-duplicate float16 features, failed trials, failed layers


def near_duplicate_features(seed: int, n_train: int = 264, n_val: int = 66, d: int = 32, classes: int = 12,
                            members: int = 4):
    """Like tiny-random's `notes` features, on which `musicrfm train` used to stop: a large common offset,
    one dominant direction and a fast-decaying spectrum (nearly rank-deficient), groups of `members`
    near-identical same-class clips, rounded to float16, and one exact duplicate training row."""
    g = torch.Generator().manual_seed(seed)
    n = n_train + n_val
    labels = torch.arange(n) % classes
    spectrum = torch.cat([torch.tensor([1.0, 0.1]), torch.logspace(-1.8, -3.6, d - 2)]).double()
    basis = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    groups = torch.arange(n) // (classes * members) * classes + labels
    group_centres = torch.randn(int(groups.max()) + 1, d, generator=g, dtype=torch.float64)
    class_centres = torch.randn(classes, d, generator=g, dtype=torch.float64)
    X = (class_centres[labels] + group_centres[groups] + 0.01 * torch.randn(n, d, generator=g, dtype=torch.float64))
    X = (X * spectrum) @ basis.T
    X = 0.4 * torch.randn(d, generator=g, dtype=torch.float64) + 0.02 * X / X.norm(dim=1).mean()
    X = X.to(torch.float16)
    X[1] = X[1 + classes]
    return X[:n_train], labels[:n_train], X[n_train:], labels[n_train:]


def test_near_duplicate_float16_features_train(monkeypatch):
    """These features (seed 1) stopped the search with 'kernel matrix is not positive definite even with
    jitter 1e-2': the float32 distance matrix under a learned M was not symmetric, the centred AGOP's
    algebra (which assumes it is) multiplied that by alphas ~1e3, and M came out indefinite, then K. Now
    every M stays positive semi-definite and no trial fails."""
    X, y, Xv, yv = near_duplicate_features(seed=1)
    assert len(torch.unique(X, dim=0)) < len(X)  # the duplicate row
    metrics = []
    next_metric = rfm._Problem.next_metric

    def recording(self, *args, **kwargs):
        M = next_metric(self, *args, **kwargs)
        if M is not None:
            metrics.append(torch.linalg.eigvalsh(M.double()))
        return M

    monkeypatch.setattr(rfm._Problem, "next_metric", recording)
    search = SearchConfig(trials=4, iterations=5, halving=1, patience=None, bandwidth_range=(30.0, 100.0),
                          reg_range=(1e-5, 1e-4), exponent_range=(1.0, 1.4), center_grads=(True,))
    results = fit_binary_directions(X, y, Xv, yv, 12, search)
    assert len(metrics) >= 8
    for evals in metrics:
        assert float(evals[0]) >= -1e-6 * float(evals[-1])
    assert all(r.failed_trials == 0 and r.search_fits == 4 * 6 for r in results)
    for r in results:
        assert torch.isfinite(r.direction).all() and math.isclose(float(r.direction.norm()), 1.0, rel_tol=1e-5)
    assert sum(r.val_auc for r in results) / 12 > 0.8


def test_training_distances_are_exactly_symmetric():
    g = torch.Generator().manual_seed(0)
    Z = torch.randn(200, 16, generator=g) * torch.logspace(0, -3, 16)
    A = torch.randn(16, 16, generator=g)
    M = A @ A.T + torch.diag(torch.logspace(3, -3, 16))  # anisotropic, as learned metrics are
    d2 = rfm._sq_distances(Z, Z, M)
    assert torch.equal(d2, d2.T) and bool((d2.diagonal() == 0).all())
    exact = rfm._sq_distances(Z, Z, M, exact=True)
    assert exact.dtype == torch.float64 and torch.equal(exact, exact.T)


def test_gradient_factors_redo_cancelling_sums_in_float64():
    """Near-duplicate points with large alphas of opposite signs: the float32 products lose ~1 % to
    rounding, which the check against the exact mean gradient catches; the factors then come in float64."""
    g = torch.Generator().manual_seed(0)
    n, r = 60, 8
    Z = torch.randn(n, r, generator=g)
    Z[1::2] = Z[0::2] + 1e-5 * torch.randn(n // 2, r, generator=g)
    config = RFMConfig(bandwidth=30.0, exponent=1.0)
    d2 = rfm._sq_distances(Z, Z, None, exact=True)
    K, s = rfm._kernel(d2, config)
    W = rfm._gradient_weights(K, s, d2, config)
    alpha = torch.randn(n, 2, generator=g, dtype=torch.float64)
    alpha[1::2] = -alpha[0::2] * (1 + 1e-7 * torch.randn(n // 2, 2, generator=g, dtype=torch.float64))
    Z64 = Z.double()
    for c, H in enumerate(rfm._gradient_factors(Z, W, alpha, range(2))):
        exact = (W @ alpha[:, c]).unsqueeze(1) * Z64 - W @ (alpha[:, c, None] * Z64)
        H32 = (W @ alpha[:, c]).float().unsqueeze(1) * Z - W.float() @ (alpha[:, c, None].float() * Z)
        assert float((H32.double() - exact).norm() / exact.norm()) > 1e-3  # float32 is not good enough here
        assert H.dtype == torch.float64
        assert float((H - exact).norm() / exact.norm()) < 1e-10
    # Well-conditioned sums stay in float32.
    X, y, Xv, yv, _ = split("sign")
    problem, _ = rfm._classification_problem(X, y, Xv, yv, 2, SMALL, multiclass=False)
    fit = problem.fit(RFMConfig(), None)
    W = rfm._gradient_weights(fit.K, fit.s, fit.d2, RFMConfig())
    assert all(H.dtype == torch.float32 for H in rfm._gradient_factors(problem.Z, W, fit.alpha, range(2)))


def test_failed_trials_are_skipped_and_a_search_where_all_fail_raises(monkeypatch):
    X, y, Xv, yv, u = split("sign")
    solve = rfm._solve_krr
    threshold = 1e-2

    def failing_small_ridges(K, reg, Y, jitters=rfm._ESCALATED_JITTERS):
        if reg < threshold:
            raise rfm._FitFailure(f"forced failure at reg {reg:.3g}")
        return solve(K, reg, Y, jitters)

    monkeypatch.setattr(rfm, "_solve_krr", failing_small_ridges)
    search = SearchConfig(trials=8, iterations=3, seed=0)
    small_ridges = sum(c.reg < threshold for c in search.sample())
    assert 0 < small_ridges < 8
    results = fit_binary_directions(X, y, Xv, yv, 2, search)
    assert all(r.failed_trials == small_ridges for r in results)
    assert all(r.config.reg >= threshold for r in results)  # the kept fits come from trials that worked
    assert abs(float(results[1].direction @ u)) > 0.9
    assert fit_multiclass(X, y, Xv, yv, 2, search).failed_trials == small_ridges

    threshold = math.inf  # every fit of every trial fails
    with pytest.raises(ProbeFailure, match=r"every trial of the search failed numerically \(8 of 8 trials.*forced"):
        fit_binary_directions(X, y, Xv, yv, 2, search)
    with pytest.raises(ProbeFailure, match="every trial"):
        fit_multiclass(X, y, Xv, yv, 2, search)
    with pytest.raises(ProbeFailure, match="every trial"):
        fit_regression(X, X @ u, Xv, Xv @ u, search)


def test_identical_features_are_degenerate_for_every_probe():
    y, yv = torch.arange(20) % 2, torch.arange(10) % 2
    X, Xv = torch.ones(20, 4), torch.ones(10, 4)
    for fit in (lambda: fit_binary_directions(X, y, Xv, yv, 2, SMALL), lambda: fit_linear_directions(X, y, Xv, yv, 2),
                lambda: fit_mean_difference(X, y, Xv, yv, 2)):
        with pytest.raises(DegenerateFeatures) as info:
            fit()
        assert isinstance(info.value, ProbeFailure) and isinstance(info.value, ValueError)


def test_solve_escalates_the_ridge_then_fails():
    K = torch.ones(4, 4, dtype=torch.float64)
    K[0, 1] = K[1, 0] = 1.5  # indefinite: not a kernel matrix
    Y = torch.eye(4, dtype=torch.float64)
    alpha = rfm._solve_krr(K, 0.5, Y)  # the ridge alone is not enough; 1e-2 more is
    assert torch.isfinite(alpha).all()
    with pytest.raises(rfm._FitFailure, match="ridge raised from 0.001 to 0.011"):
        rfm._solve_krr(K, 1e-3, Y)
    with pytest.raises(rfm._FitFailure):
        rfm._solve_krr(K, 1e-3, Y, rfm._ROUNDING_JITTERS)
