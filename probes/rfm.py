"""Recursive Feature Machine (RFM) probes and the concept directions read from them.

The probe (paper §3.1-3.2 and App. A-B):
  kernel     K(x, z) = exp(-||x - z||_M^q / L^q),  ||u||_M = sqrt(u^T M u)   (L = bandwidth, q = exponent)
  predictor  kernel ridge regression: (K(X, X) + reg I) alpha = Y,  f(x) = K(x, X) alpha,  Y [n, c]
  AGOP       (1/n) sum_i grad f(x_i) grad f(x_i)^T, from the analytic gradient of f
  RFM        M_0 = I; fit f, set M to the AGOP (normalised), refit; `iterations` updates; the fit with the
             best validation score is kept (ROC AUC of the scores, accuracy, or MSE for regression)
  direction  top eigenvector (exact `torch.linalg.eigh`) of the class's own uncentred AGOP at the kept
             fit, signed so that moving along +direction raises the class score on average over the
             training points: sign(mean_i grad f_c(x_i) . q) (the first-order change of f_c).

Decisions that differ from, or go beyond, the reference code (docs/probes.md has the measurements):
  * Features are centred on the training mean and divided by ONE global scale chosen so that the RMS
    distance between training points is 10, the geometric centre of the paper's bandwidth range
    L ~ logU(1, 100): the range then spans 0.1x-10x the typical distance whatever the layer's activation
    scale or width. The map is isotropic, so a direction found in these coordinates is the direction in
    the original feature space (directions are returned there, as unit float32 vectors).
  * M is normalised so that the mean squared M-norm of the training points stays what it was under
    M = I (xrfm divides by the largest entry instead): the bandwidth means the same at every iteration.
  * When d > n everything runs in the orthonormal basis of the centred training points (r <= n columns).
    This is exact: every M after the first is built from gradients that lie in that span, and the first
    (M = I) gets the part of a query point outside the span added to its distances.
  * One search per layer serves every class. With one-hot targets the multi-output solve gives each class
    exactly the predictor a one-vs-rest KRR with that kernel would give; M is learned from the AGOP summed
    over classes (the paper's multiclass RFM, one kernel and one Cholesky solve per fit instead of one per
    class), and every class keeps its own best (trial, iteration) by its own validation AUC.
    `shared_metric=False` is the paper's protocol instead: one binary (0/1) RFM per class, each with its
    own search and its own M (fit_binary_directions, fit_multiclass; docs/probes.md compares the two).
  * fit_aggregated is the paper's multi-layer "aggregation model" (App. B): each layer's probe gives the top
    eigenvectors of its AGOP, the features projected on them are concatenated over layers, and one more
    RFM is fitted on that (kernel K_{2,q} only: the paper's K_{p,q} search is not implemented).
  * Trials are drawn from the paper's ranges and pruned by successive halving: every trial runs its first
    fits (M = I, then one AGOP update), the best 1/halving continue to iteration 3, 7, 15. The M = I fit
    reuses one cached Euclidean distance matrix across trials.
  * AUC is computed from scores (never from hard labels, the reference code's bug), ties counted 1/2.

Precision: Gram matrices (n^2 r) run in float32, kernel matrices, solves and AGOP algebra in float64.
Everything runs on the device of the training features (or SearchConfig.device).

Robustness (docs/probes.md, "Numerical robustness"): training distances are symmetrised exactly, M is kept
positive semi-definite, float32 gradient factors are checked against their exact mean and redone in
float64 when they miss it, and a failed Cholesky is retried on a float64 kernel with the ridge raised. A fit
that still fails ends its trial (a failed trial; the search goes on); when every trial fails the fit
functions raise ProbeFailure, which per-layer training reports and survives.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "RFMConfig",
    "SearchConfig",
    "FeatureMap",
    "KernelPredictor",
    "ProbeResult",
    "Classifier",
    "Regressor",
    "PredictorStack",
    "LayerProjection",
    "AggregatedClassifier",
    "fit_binary_directions",
    "fit_multiclass",
    "fit_aggregated",
    "fit_regression",
    "roc_auc",
    "fit_temperature",
    "check_classification_inputs",
    "ProbeFailure",
    "DegenerateFeatures",
]

# Features are scaled so that the mean squared distance between training points is TARGET_RMS_DISTANCE^2.
TARGET_RMS_DISTANCE = 10.0
# Squared distances below this (in those units: 1e-6 of the mean) count as coincident points, whose pair
# contributes no gradient (the Laplace kernel is not differentiable there; float32 Gram noise is ~1e-5).
_COINCIDENT_SQ_DISTANCE = 1e-6 * TARGET_RMS_DISTANCE**2
# Rows of query points processed at once by KernelPredictor (bounds the [rows, n] kernel block).
_PREDICT_CHUNK = 4096
# Diagonal jitters tried on K + reg I when its Cholesky fails. The first three only guard rounding (kernel
# from float32 Gram matrices); the float64 kernel then gets the whole ladder, its top raising the ridge to
# reg + 1e-2 (K's diagonal is 1). A fit that fails even so is a failed trial of the search.
_ROUNDING_JITTERS = (0.0, 1e-10, 1e-8, 1e-6)
_ESCALATED_JITTERS = (0.0, 1e-10, 1e-8, 1e-6, 1e-4, 1e-3, 1e-2)
# Gradient factors computed in float32 are redone in float64 when their mean misses the exact one by more
# than this fraction of their RMS row norm (x sqrt(n)); see _gradient_factors.
_GRADIENT_TOLERANCE = 1e-3


class ProbeFailure(RuntimeError):
    """No probe could be fitted on these features: every trial of the search failed numerically, or the
    features are degenerate. The message says why; per-layer training reports it and goes on."""


class DegenerateFeatures(ProbeFailure, ValueError):
    """The training features carry nothing to probe (e.g. every training vector is the same)."""


class _FitFailure(ArithmeticError):
    """One fit of one trial failed numerically (the search counts it as a failed trial and goes on)."""


# ------------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class RFMConfig:
    """Hyper-parameters of one RFM probe (the paper's layer-wise search space, App. B Table 7)."""

    bandwidth: float = 10.0  # L, in units where the RMS distance between training points is 10
    reg: float = 1e-3  # ridge added to the kernel matrix's diagonal (its diagonal is 1)
    exponent: float = 1.0  # q; the kernel is positive definite for 0 < q <= 2
    iterations: int = 15  # AGOP updates: the predictor is fitted iterations + 1 times (M_0 ... M_T)
    center_grads: bool = False  # centre each output's gradients before the AGOP that updates M (eq. 6)
    patience: int | None = 3  # stop after this many fits without a better validation score; None: never

    def __post_init__(self) -> None:
        if not (self.bandwidth > 0 and math.isfinite(self.bandwidth)):
            raise ValueError(f"bandwidth must be a positive number, got {self.bandwidth}")
        if not (self.reg >= 0 and math.isfinite(self.reg)):
            raise ValueError(f"reg must be >= 0, got {self.reg}")
        if not 0 < self.exponent <= 2:
            raise ValueError(f"exponent must be in (0, 2] (positive definite kernel), got {self.exponent}")
        if self.iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {self.iterations}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be >= 1 or None, got {self.patience}")


@dataclass(frozen=True)
class SearchConfig:
    """Random search over the paper's ranges, pruned by successive halving.

    `trials` configurations are drawn with `seed` (trial i is the same whatever `trials` is). Rungs end at
    iterations 1, 3, 7, 15 (capped at `iterations`); after each rung the best ceil(k / halving) trials go
    on. `budget` caps the number of predictor fits (one fit = kernel, solve, validation scores and AGOP,
    for every class at once); the search stops where the cap is reached and keeps what it has seen.
    halving=1 and budget=None is a plain random search (each trial to `iterations` or its patience).
    """

    trials: int = 100
    seed: int = 0
    budget: int | None = None
    halving: int = 3
    iterations: int = 15
    patience: int | None = 3
    bandwidth_range: tuple[float, float] = (1.0, 100.0)  # log-uniform
    reg_range: tuple[float, float] = (1e-5, 10.0)  # log-uniform
    exponent_range: tuple[float, float] = (0.7, 1.4)  # uniform
    center_grads: tuple[bool, ...] = (False, True)  # uniform choice
    device: str | None = None  # None: the device of the training features

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise ValueError(f"trials must be >= 1, got {self.trials}")
        if self.budget is not None and self.budget < 1:
            raise ValueError(f"budget must be >= 1 fit or None, got {self.budget}")
        if self.halving < 1:
            raise ValueError(f"halving must be >= 1, got {self.halving}")
        if not self.center_grads:
            raise ValueError("center_grads must offer at least one choice")
        for name in ("bandwidth_range", "reg_range", "exponent_range"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{name} must be (low, high) with 0 < low <= high, got {(lo, hi)}")
        # The remaining checks (exponent <= 2, iterations, patience) are RFMConfig's.
        RFMConfig(exponent=self.exponent_range[1], iterations=self.iterations, patience=self.patience)

    @classmethod
    def fast(cls, seed: int = 0) -> SearchConfig:
        """A small search for smoke runs and tests: 12 trials, 5 iterations, at most 40 fits."""
        return cls(trials=12, seed=seed, iterations=5, budget=40)

    def sample(self) -> list[RFMConfig]:
        """The trial configurations, deterministic for the seed."""
        rng = np.random.default_rng(self.seed)
        configs = []
        for _ in range(self.trials):
            bandwidth = math.exp(rng.uniform(*np.log(self.bandwidth_range)))
            reg = math.exp(rng.uniform(*np.log(self.reg_range)))
            exponent = float(rng.uniform(*self.exponent_range))
            center = bool(self.center_grads[int(rng.integers(len(self.center_grads)))])
            configs.append(RFMConfig(bandwidth=bandwidth, reg=reg, exponent=exponent, iterations=self.iterations,
                                     center_grads=center, patience=self.patience))
        return configs

    def rung_ends(self) -> list[int]:
        """Iterations at which successive halving ranks the trials: 1, 3, 7, ... and finally `iterations`."""
        ends, t = [], 1
        while t < self.iterations:
            ends.append(t)
            t = 2 * t + 1
        return ends + [self.iterations]


# ------------------------------------------------------------------------------------------------------
# Feature coordinates


@dataclass(frozen=True, eq=False)
class FeatureMap:
    """Original features -> the kernel's coordinates: centre, divide by one scale, project on a basis.

    `basis` [d, r] has orthonormal columns spanning the centred training points and is used when d > n
    (None: all of R^d). Points outside the span keep the squared norm of their outside part, which only
    the Euclidean first fit (M = I) sees.
    """

    mean: Tensor  # [d] float32
    scale: float
    basis: Tensor | None  # [d, r] float32

    @classmethod
    def fit(cls, X: Tensor) -> FeatureMap:
        n, d = X.shape
        X = X.double()  # float16 features: accumulate the mean and scale in float64
        mean = X.mean(0)
        centred = X - mean
        mean_sq_norm = float(centred.square().sum(1).mean())
        if not mean_sq_norm > 0:
            raise DegenerateFeatures("all training feature vectors are identical: there is nothing to probe")
        # Mean squared distance between two training points = 2 * mean squared norm about the mean.
        scale = math.sqrt(2.0 * mean_sq_norm) / TARGET_RMS_DISTANCE
        basis = None
        if d > n:
            _, s, vh = torch.linalg.svd(centred / scale, full_matrices=False)
            keep = s > s[0] * 1e-7  # directions the training points do not span carry no information
            basis = vh[keep].T.to(torch.float32).contiguous()
        return cls(mean=mean.to(torch.float32), scale=scale, basis=basis)

    @property
    def dim(self) -> int:
        """r, the number of kernel coordinates."""
        return int(self.mean.shape[0] if self.basis is None else self.basis.shape[1])

    def standardise(self, X: Tensor) -> Tensor:
        """(X - mean) / scale, float32 on the map's device."""
        return (X.to(self.mean.device, torch.float32) - self.mean) / self.scale

    def project(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Standardised x -> coordinates [m, r] and squared norm outside the basis [m] (None: no basis)."""
        if self.basis is None:
            return x, None
        z = x @ self.basis
        return z, (x - z @ self.basis.T).square().sum(1)

    def __call__(self, X: Tensor) -> tuple[Tensor, Tensor | None]:
        """Original features -> (coordinates [m, r] float32, squared norm outside the basis [m] or None)."""
        return self.project(self.standardise(X))

    def to_original(self, v: Tensor) -> Tensor:
        """A direction in kernel coordinates [r] -> unit vector in the original feature space [d]."""
        v = v.double()
        if self.basis is not None:
            v = self.basis.double() @ v
        return (v / v.norm()).to(torch.float32)


# ------------------------------------------------------------------------------------------------------
# Kernel algebra (float64 unless stated)


def _sq_distances(A: Tensor, B: Tensor, metric: Tensor | None, outside_a: Tensor | None = None,
                  exact: bool = False) -> Tensor:
    """Squared distances ||a - b||_M^2 [len(A), len(B)] in float64, through one float32 Gram matrix.

    `metric` None means M = I; then `outside_a` (the squared norm of each a outside the basis, which the
    training points B lack) is added. A learned M lies inside the basis and ignores that part. `exact`:
    the Gram matrix in float64 too (a fit retries so when the kernel from the float32 one fails its
    Cholesky).
    """
    if exact:
        same = B is A
        A = A.double()
        B = A if same else B.double()
        metric = None if metric is None else metric.double()
    AM = A if metric is None else A @ metric
    BM = AM if B is A else (B if metric is None else B @ metric)
    a2 = (AM * A).sum(1)
    b2 = a2 if B is A else (BM * B).sum(1)
    d2 = (a2[:, None] + b2[None, :] - 2.0 * (AM @ B.T)).double()
    if metric is None and outside_a is not None:
        d2 += outside_a.double()[:, None]
    if B is A:
        # Exactly symmetric, so K and the gradient weights W are too: (A M) A^T in float32 is not, by up to
        # ~1e-7 of |A M| |A| (1e-3 of the mean distance for an anisotropic M), and the AGOP algebra that
        # assumes W = W^T multiplies that by alpha (~1e4 with near-duplicate points and a small ridge): the
        # centred AGOP came out indefinite, then M, then K beyond any jitter.
        d2 = (d2 + d2.T) / 2.0
        d2.diagonal().zero_()  # exact zeros where the Gram's rounding would leave ~1e-6
    return d2.clamp_min_(0.0)


def _kernel(d2: Tensor, config: RFMConfig) -> tuple[Tensor, Tensor]:
    """K = exp(-(r/L)^q) and s = (r/L)^q from squared distances r^2."""
    s = (d2 / config.bandwidth**2).pow(config.exponent / 2.0)
    return torch.exp(-s), s


def _gradient_weights(K: Tensor, s: Tensor, d2: Tensor, config: RFMConfig) -> Tensor:
    """W with grad_x K(x, z) = W(x, z) * M (x - z): W = -q (r/L)^q K / r^2, zero for coincident points."""
    W = -config.exponent * K * s / d2.clamp_min(_COINCIDENT_SQ_DISTANCE)
    return W.masked_fill_(d2 <= _COINCIDENT_SQ_DISTANCE, 0.0)


def _solve_krr(K: Tensor, reg: float, Y: Tensor, jitters: Sequence[float] = _ESCALATED_JITTERS) -> Tensor:
    """alpha = (K + reg I)^-1 Y by Cholesky, float64. K is positive semi-definite in exact arithmetic (M is
    kept PSD), so the jitters (added to the diagonal in turn) only absorb rounding; raises _FitFailure
    when the last one does not make K + reg I positive definite, or the solution is not finite."""
    A = K.to(torch.float64, copy=True)
    A.diagonal().add_(reg)
    added = 0.0
    for jitter in jitters:
        if jitter > added:
            A.diagonal().add_(jitter - added)
            added = jitter
        chol, info = torch.linalg.cholesky_ex(A)
        if int(info) == 0:
            alpha = torch.cholesky_solve(Y.to(torch.float64), chol)
            if bool(torch.isfinite(alpha).all()):
                return alpha
            break
    raise _FitFailure(f"kernel matrix K + reg I is not positive definite (or its solve not finite) even with the "
                      f"ridge raised from {reg:.3g} to {reg + added:.3g}")


def _gradient_factors(Z: Tensor, W: Tensor, alpha: Tensor, outputs: Sequence[int]) -> Iterator[Tensor]:
    """Per output c, H_c [n, r] with grad f_c(z_j) = H_c[j] M at the training points.

    grad f_c(x_j) = sum_i alpha_ic W_ji M (x_j - x_i), so H_c = u_c * Z - W (alpha_c * Z), u_c = W alpha_c
    (float32: n^2 r flops per output).

    Float32 is checked, not trusted: near-duplicate training points with a small ridge get large alphas of
    opposite signs whose terms cancel, and the float32 products can lose several digits (~1 % in the
    test's pairs). The exact mean of H_c's rows costs n^2 + n r in float64 (mean_j H_c[j] =
    Z^T (u_c - alpha_c * (W^T 1)) / n); an output whose float32 rows miss it by more than
    _GRADIENT_TOLERANCE of their RMS norm (scaled by sqrt(n), as averaging shrinks random rounding) is
    recomputed in float64 and yielded as such.
    """
    n = Z.shape[0]
    u64 = W @ alpha
    exact_mean = (Z.double().T @ (u64 - alpha * W.sum(0)[:, None])).T / n  # [c, r]
    u = u64.to(torch.float32)
    W32, alpha32 = W.to(torch.float32), alpha.to(torch.float32)
    Z64 = W64 = None
    for c in outputs:
        H = u[:, c, None] * Z - W32 @ (alpha32[:, c, None] * Z)
        rms = math.sqrt(float(H.square().sum(dtype=torch.float64)) / n)
        miss = float((H.sum(0, dtype=torch.float64) / n - exact_mean[c]).norm())
        if not miss * math.sqrt(n) <= _GRADIENT_TOLERANCE * rms:  # NaN goes to float64 too
            if Z64 is None:
                Z64, W64 = Z.double(), W.double()
            H = u64[:, c, None] * Z64 - W64 @ (alpha[:, c, None].double() * Z64)
        yield H


def _agop_sum(Z: Tensor, W: Tensor, alpha: Tensor, center: bool) -> Tensor:
    """S [r, r] float64 with sum_c AGOP_c = M S M / n at the training points (M applied by the caller).

    S = sum_c H_c^T H_c (H_c from `_gradient_factors`), minus n hbar_c hbar_c^T per output when centring
    (each output's gradients about their own mean; xrfm pools all outputs into one mean). Two exact ways,
    the cheaper one is used:
      per output: c products W (alpha_c * Z), c n^2 r float32 flops;
      one n x n matrix: sum_c (D_c - W A_c)^T (D_c - W A_c) with D_c = diag(u_c), A_c = diag(alpha_c)
        = diag(sum_c u_c^2) - W o (u alpha^T + alpha u^T) + (W W) o (alpha alpha^T)   (W symmetric),
        then Z^T B Z: n^3 + n^2 r float64 flops, independent of c (wins for many classes and n < c r).
    """
    n, r = Z.shape
    c = alpha.shape[1]
    u = W @ alpha  # [n, c]
    if 2.0 * (n**3 + n * n * r) < c * n * n * r:  # float64 counted twice: it runs at half speed
        B = (W @ W) * (alpha @ alpha.T)
        B -= W * (u @ alpha.T + alpha @ u.T)
        B.diagonal().add_(u.square().sum(1))
        Z64 = Z.double()
        S = Z64.T @ B @ Z64
        if center:
            # sum_j H_c[j] = Z^T (u_c - alpha_c * (W^T 1)): the mean gradient of every output, removed.
            column = Z64.T @ (u - alpha * W.sum(0)[:, None])  # [r, c]
            S -= column @ column.T / n
    else:
        S = torch.zeros(r, r, dtype=torch.float64, device=Z.device)
        for H in _gradient_factors(Z, W, alpha, range(c)):
            if center:
                # Centred rows, then the product: PSD by construction (subtracting n hbar hbar^T afterwards
                # cancels badly where the gradients are nearly all alike).
                H = H - (H.sum(0, dtype=torch.float64) / H.shape[0]).to(H.dtype)
            S += (H.T @ H).double()
    return (S + S.T) / 2.0


def _clip_to_psd(S: Tensor) -> Tensor | None:
    """S [r, r] float64 symmetric, with eigenvalues below -1e-9 of its trace set to zero (None: not finite).

    A metric M must be positive semi-definite: then ||x - z||_M is a distance and the kernel matrix is PSD
    (0 < q <= 2). AGOPs are PSD in exact arithmetic; rounding of the centred form can leave small negative
    eigenvalues, and an indefinite M makes K indefinite whatever the ridge. A Cholesky test skips the
    eigendecomposition in the usual case."""
    if not bool(torch.isfinite(S).all()):
        return None
    tol = 1e-9 * max(float(S.diagonal().sum()), 1e-300)
    shifted = S.clone()
    shifted.diagonal().add_(tol)
    if int(torch.linalg.cholesky_ex(shifted)[1]) == 0:
        return S
    try:
        evals, evecs = torch.linalg.eigh(S)
    except torch.linalg.LinAlgError:
        return None
    return (evecs * evals.clamp_min(0.0)) @ evecs.T


# ------------------------------------------------------------------------------------------------------
# Metrics


def roc_auc(scores: Tensor, positive: Tensor) -> Tensor:
    """ROC AUC of each column of `scores` ([m] or [m, c]) against the boolean `positive` of the same shape.

    Mann-Whitney statistic with average ranks, so tied scores count 1/2 (a constant score gives 0.5).
    NaN where a column has no positive or no negative example. Returns float64 [] or [c].
    """
    if scores.shape != positive.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and positive {tuple(positive.shape)} differ in shape")
    squeeze = scores.ndim == 1
    s = scores.double().reshape(scores.shape[0], -1).T.contiguous()  # [c, m]
    pos = positive.bool().reshape(positive.shape[0], -1).T
    sorted_s = s.sort(dim=1).values
    below = torch.searchsorted(sorted_s, s, right=False)
    at_or_below = torch.searchsorted(sorted_s, s, right=True)
    rank = (below + at_or_below + 1).double() / 2.0  # 1-based average rank
    n_pos = pos.sum(1).double()
    n_neg = pos.shape[1] - n_pos
    auc = ((rank * pos).sum(1) - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    auc = torch.where((n_pos > 0) & (n_neg > 0), auc, torch.full_like(auc, float("nan")))
    return auc[0] if squeeze else auc


def fit_temperature(logits: Tensor, labels: Tensor) -> float:
    """Softmax temperature minimising the validation log-loss, on a log grid (argmax is unaffected).

    KRR outputs live on the 0/1 scale of one-hot targets; a plain softmax of them is nearly uniform.
    """
    logits = logits.double()
    grid = torch.logspace(-3, 2, 61, dtype=torch.float64).tolist()
    losses = [float(torch.nn.functional.cross_entropy(logits / t, labels.to(logits.device))) for t in grid]
    return float(grid[int(np.argmin(losses))])


# ------------------------------------------------------------------------------------------------------
# Fitted objects


@dataclass(frozen=True, eq=False)
class KernelPredictor:
    """A fitted multi-output kernel ridge regressor f(x) = K(x, X) alpha with a learned Mahalanobis M."""

    features: FeatureMap
    centers: Tensor  # [n, r] float32, the training points in kernel coordinates
    metric: Tensor | None  # [r, r] float32 M; None: Euclidean (the first fit, M = I)
    alpha: Tensor  # [n, c] float64
    config: RFMConfig
    iteration: int  # the RFM iteration this fit came from (0: M = I)

    def _chunks(self, X: Tensor) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor, Tensor]]:
        """Per block of query rows: (standardised x, kernel coords z, squared distances, K, s)."""
        f = self.features
        for start in range(0, X.shape[0], _PREDICT_CHUNK):
            x = f.standardise(X[start:start + _PREDICT_CHUNK])
            z, outside = f.project(x)
            d2 = _sq_distances(z, self.centers, self.metric, outside)
            K, s = _kernel(d2, self.config)
            yield x, z, d2, K, s

    def scores(self, X: Tensor) -> Tensor:
        """f(X) [m, c] float32 (the raw KRR outputs: class scores or the z-scored regression target)."""
        return torch.cat([(K @ self.alpha).to(torch.float32) for *_, K, _ in self._chunks(X)])

    def gradients(self, X: Tensor, output: int) -> Tensor:
        """Analytic grad_x f_output(x) [m, d] float32 in the ORIGINAL feature space."""
        f = self.features
        a = self.alpha[:, output]
        weighted_centers = a.to(torch.float32)[:, None] * self.centers
        rows = []
        for x, z, d2, K, s in self._chunks(X):
            W = _gradient_weights(K, s, d2, self.config)
            u = (W @ a).to(torch.float32)
            g = u[:, None] * z - W.to(torch.float32) @ weighted_centers  # sum_i alpha_i W_i (z - z_i)
            if self.metric is not None:
                g = g @ self.metric  # M is symmetric; a learned M lives inside the basis
            if f.basis is not None:
                g_full = g @ f.basis.T
                if self.metric is None:  # under M = I the part of x outside the span pulls too
                    g_full += u[:, None] * (x - z @ f.basis.T)
                g = g_full
            rows.append(g / f.scale)  # kernel coordinates are (x - mean) / scale
        return torch.cat(rows)

    def agop(self) -> Tensor:
        """The uncentred AGOP summed over outputs at the training points, [r, r] float64 in kernel
        coordinates (gradients w.r.t. the standardised features): what the next RFM iteration's M is
        made of, and whose top eigenvector is a binary probe's direction."""
        d2 = _sq_distances(self.centers, self.centers, self.metric)
        K, s = _kernel(d2, self.config)
        S = _agop_sum(self.centers, _gradient_weights(K, s, d2, self.config), self.alpha, False)
        if self.metric is not None:
            m = self.metric.double()
            S = m @ S @ m
        return (S + S.T) / (2.0 * self.centers.shape[0])


@dataclass(frozen=True, eq=False)
class PredictorStack:
    """Several single-output predictors read as one multi-output one: column c is predictors[c]'s output
    (the per-class-M multiclass probe: one binary RFM per class, each with its own M)."""

    predictors: tuple[KernelPredictor, ...]

    def scores(self, X: Tensor) -> Tensor:
        """[m, c] float32: every class's own binary score."""
        return torch.cat([p.scores(X)[:, :1] for p in self.predictors], dim=1)


@dataclass(frozen=True, eq=False)
class ProbeResult:
    """One class's concept direction at one layer (one-vs-rest), from an RFM or a baseline probe."""

    direction: Tensor  # [d] float32, unit, in the original feature space; +direction raises the class score
    val_auc: float  # validation ROC AUC of the probe's scores for this class vs the rest
    config: RFMConfig | None  # None for baselines
    best_iteration: int  # RFM iteration of the kept fit (0: M = I); 0 for baselines
    class_index: int = -1
    method: str = "rfm"  # "rfm", "linear" (ridge / MSE probe) or "mean_difference"
    eigenvalue: float = float("nan")  # top AGOP eigenvalue, gradients w.r.t. original features
    explained: float = float("nan")  # eigenvalue / trace of the AGOP: how one-dimensional the probe is
    sign_margin: float = float("nan")  # cos(mean training gradient, direction) > 0; near 0: sign is weak
    search_fits: int = 0  # predictor fits the whole search used (shared by every class of the call)
    predictor: KernelPredictor | None = None  # kept only with keep_predictors=True (memory: n x r + r x r)
    output_index: int = -1  # the predictor's output column that scores this class
    ridge: float = float("nan")  # the linear probe's ridge (baselines.fit_linear_directions)
    failed_trials: int = 0  # search trials stopped by a numerical failure (shared by every class of the call)


@dataclass(frozen=True, eq=False)
class Classifier:
    """Multiclass RFM probe: one-hot KRR outputs, softmax with a validation-fitted temperature.

    `predictor` is one multi-output KernelPredictor (shared M) or a PredictorStack of per-class binary
    predictors (per-class M, `shared_metric=False`); `config` and `best_iteration` are the shared fit's
    (for a stack: its first class's)."""

    predictor: KernelPredictor | PredictorStack
    temperature: float
    val_accuracy: float
    val_auc: float  # mean one-vs-rest AUC over classes present in validation
    search_fits: int
    failed_trials: int = 0  # search trials stopped by a numerical failure

    @property
    def shared_metric(self) -> bool:
        return isinstance(self.predictor, KernelPredictor)

    @property
    def config(self) -> RFMConfig:
        first = self.predictor if self.shared_metric else self.predictor.predictors[0]
        return first.config

    @property
    def best_iteration(self) -> int:
        first = self.predictor if self.shared_metric else self.predictor.predictors[0]
        return first.iteration

    def predict_proba(self, X: Tensor) -> Tensor:
        return torch.softmax(self.predictor.scores(X).double() / self.temperature, dim=1).to(torch.float32)

    def predict(self, X: Tensor) -> Tensor:
        return self.predictor.scores(X).argmax(dim=1)


@dataclass(frozen=True, eq=False)
class Regressor:
    """RFM regression probe on a z-scored target, with its direction (+direction raises the target)."""

    predictor: KernelPredictor
    target_mean: float
    target_std: float
    direction: Tensor  # [d] float32 unit, original feature space
    eigenvalue: float
    explained: float
    sign_margin: float
    val_mse: float  # in z units (1.0 = predicting the training mean)
    val_r2: float
    search_fits: int
    failed_trials: int = 0  # search trials stopped by a numerical failure

    @property
    def config(self) -> RFMConfig:
        return self.predictor.config

    @property
    def best_iteration(self) -> int:
        return self.predictor.iteration

    def predict(self, X: Tensor) -> Tensor:
        return self.predictor.scores(X)[:, 0] * self.target_std + self.target_mean


# ------------------------------------------------------------------------------------------------------
# The search


# A validation score: compared as a tuple, higher is better (e.g. (accuracy, mean AUC) or (-MSE,)).
Key = tuple[float, ...]
# Validation scores of one fit [n_val, c] -> (key, per-output scores [c] or None).
Evaluator = Callable[[Tensor], tuple[Key, Tensor | None]]


@dataclass(frozen=True, eq=False)
class _Snapshot:
    """Everything needed to rebuild one fit's predictor (cheap: references, no copies)."""

    config: RFMConfig
    iteration: int
    metric: Tensor | None
    alpha: Tensor
    key: Key


@dataclass(eq=False)
class _Trial:
    index: int
    config: RFMConfig
    metric: Tensor | None = None  # M of the next fit (or, while `deferred` is set, of the last one)
    deferred: Tensor | None = None  # alpha of the last fit when its AGOP waits for the trial to survive
    next_iteration: int = 0
    best_key: Key = (-math.inf,)
    since_best: int = 0
    done: bool = False


@dataclass(frozen=True, eq=False)
class _Fit:
    """One fit's solution and validation scores, with the kernel pieces the AGOP reuses."""

    alpha: Tensor
    key: Key
    per_output: Tensor | None
    K: Tensor
    s: Tensor
    d2: Tensor


@dataclass(eq=False)
class _Outcome:
    best: _Snapshot | None = None
    per_output: list[_Snapshot | None] = field(default_factory=list)
    per_output_score: list[float] = field(default_factory=list)
    fits: int = 0
    failures: list[tuple[int, int, str]] = field(default_factory=list)  # (trial, iteration, reason) per failed trial
    trials: int = 0

    def failure_summary(self) -> str:
        """Why no fit succeeded, for ProbeFailure's message."""
        if not self.failures:
            return f"no fit completed in the search's budget ({self.fits} fits)"
        reasons: dict[str, int] = {}
        for _, _, reason in self.failures:
            reasons[reason] = reasons.get(reason, 0) + 1
        common = max(reasons, key=reasons.get)
        rest = "" if len(self.failures) == self.trials else ", the rest never ran within the budget"
        return (f"every trial of the search failed numerically ({len(self.failures)} of {self.trials} trials "
                f"failed{rest}; e.g. {common})")


class _Problem:
    """One search's data in kernel coordinates, plus what every fit reuses."""

    def __init__(self, X_tr: Tensor, Y: Tensor, X_val: Tensor, evaluate: Evaluator):
        self.features = FeatureMap.fit(X_tr)
        self.Z, _ = self.features(X_tr)
        self.Z_val, self.outside_val = self.features(X_val)
        self.Y = Y.to(self.Z.device, torch.float64)
        self.evaluate = evaluate
        self.mean_sq_norm = float(self.Z.double().square().sum(1).mean())
        # Under M = I the distances do not depend on the trial: computed once, shared by every trial.
        self._euclidean = (_sq_distances(self.Z, self.Z, None),
                           _sq_distances(self.Z_val, self.Z, None, self.outside_val))
        self._euclidean_exact: Tensor | None = None  # the training part in float64, made when first needed

    def with_targets(self, Y: Tensor, evaluate: Evaluator) -> _Problem:
        """The same features (coordinates and the cached M = I distances shared, not copied) with other
        targets: one class's binary problem of the per-class-M protocol."""
        other = copy.copy(self)
        other.Y, other.evaluate = Y.to(self.Z.device, torch.float64), evaluate
        return other

    def distances(self, metric: Tensor | None) -> tuple[Tensor, Tensor]:
        if metric is None:
            return self._euclidean
        return _sq_distances(self.Z, self.Z, metric), _sq_distances(self.Z_val, self.Z, metric)

    def exact_train_distances(self, metric: Tensor | None) -> Tensor:
        """Training squared distances with a float64 Gram matrix (the retry of a fit whose solve failed)."""
        if metric is not None:
            return _sq_distances(self.Z, self.Z, metric, exact=True)
        if self._euclidean_exact is None:
            self._euclidean_exact = _sq_distances(self.Z, self.Z, None, exact=True)
        return self._euclidean_exact

    def fit(self, config: RFMConfig, metric: Tensor | None) -> _Fit:
        """One KRR fit with its validation scores; raises _FitFailure when it fails numerically.

        The kernel comes from float32 Gram matrices with a rounding guard; if its Cholesky fails, the
        training kernel is rebuilt in float64 throughout and solved with the ridge raised step by step."""
        d2, d2_val = self.distances(metric)
        K, s = _kernel(d2, config)
        try:
            alpha = _solve_krr(K, config.reg, self.Y, _ROUNDING_JITTERS)
        except _FitFailure:
            d2 = self.exact_train_distances(metric)
            K, s = _kernel(d2, config)
            alpha = _solve_krr(K, config.reg, self.Y, _ESCALATED_JITTERS)
        key, per_output = self.evaluate(_kernel(d2_val, config)[0] @ alpha)
        if not all(math.isfinite(k) for k in key):
            raise _FitFailure("the fit's validation score is not finite")
        return _Fit(alpha, key, per_output, K, s, d2)

    def next_metric(self, config: RFMConfig, metric: Tensor | None, alpha: Tensor,
                    fit: _Fit | None = None) -> Tensor | None:
        """The AGOP summed over outputs of the fit (metric, alpha), normalised so the mean squared M-norm of
        the training points is unchanged. `fit` supplies the kernel pieces (recomputed without it). None
        when the gradients vanish (e.g. a bandwidth so small that K = I): nothing left to learn."""
        if fit is None:
            d2 = self.distances(metric)[0]
            K, s = _kernel(d2, config)
        else:
            K, s, d2 = fit.K, fit.s, fit.d2
        S = _agop_sum(self.Z, _gradient_weights(K, s, d2, config), alpha, config.center_grads)
        if metric is not None:
            m = metric.double()
            S = m @ S @ m
            S = (S + S.T) / 2.0
        S = _clip_to_psd(S)
        if S is None:
            return None
        Z64 = self.Z.double()
        norm = float(((Z64 @ S) * Z64).sum(1).mean())  # mean z^T S z: S is n x AGOP, the scale goes anyway
        if not (math.isfinite(norm) and norm > 1e-300):
            return None
        return (S * (self.mean_sq_norm / norm)).to(torch.float32)

    def predictor(self, snap: _Snapshot) -> KernelPredictor:
        return KernelPredictor(self.features, self.Z, snap.metric, snap.alpha, snap.config, snap.iteration)


def _run_search(problem: _Problem, search: SearchConfig, n_outputs: int) -> _Outcome:
    running = [_Trial(i, c) for i, c in enumerate(search.sample())]
    out = _Outcome(per_output=[None] * n_outputs, per_output_score=[-math.inf] * n_outputs, trials=len(running))
    for end in search.rung_ends():
        # Successive halving: of the trials entering this rung, the best ceil(k / halving) that have not
        # stopped go on. Only their M stays alive (one r x r matrix each); ties go to the lower index.
        keep = math.ceil(len(running) / search.halving)
        survivors: list[_Trial] = []
        for trial in running:
            while not trial.done and trial.next_iteration <= end:
                if search.budget is not None and out.fits >= search.budget:
                    return out
                _step(problem, trial, out, end)
            if trial.done:
                continue  # its fits are already recorded in `out`
            survivors.append(trial)
            if len(survivors) > keep:
                worst = min(survivors, key=lambda t: (t.best_key, -t.index))
                survivors.remove(worst)
                worst.metric = worst.deferred = None
        running = survivors
        if not running:
            break
    return out


def _step(problem: _Problem, trial: _Trial, out: _Outcome, rung_end: int) -> None:
    """One fit of one trial: score it, record bests, then update M unless the trial stops here.

    At the rung's last fit the AGOP is deferred (alpha kept, kernel recomputed later): most trials are
    dropped there, and the AGOP costs more than the fit.
    """
    config, t = trial.config, trial.next_iteration
    if trial.deferred is not None:
        trial.metric = problem.next_metric(config, trial.metric, trial.deferred)
        trial.deferred = None
        if trial.metric is None:
            trial.done = True
            return
    try:
        fit = problem.fit(config, trial.metric)
    except _FitFailure as exc:
        # A failed trial: it stops here (the fits it completed before stay candidates) and the search goes on.
        out.fits += 1
        out.failures.append((trial.index, t, str(exc)))
        trial.done, trial.metric = True, None
        return
    out.fits += 1
    snap = _Snapshot(config, t, trial.metric, fit.alpha, fit.key)
    if out.best is None or fit.key > out.best.key:
        out.best = snap
    if fit.per_output is not None:
        for c, score in enumerate(fit.per_output.tolist()):
            if score > out.per_output_score[c]:  # NaN never wins
                out.per_output_score[c] = score
                out.per_output[c] = snap
    if fit.key > trial.best_key:
        trial.best_key, trial.since_best = fit.key, 0
    else:
        trial.since_best += 1
    trial.next_iteration = t + 1
    if t >= config.iterations or (config.patience is not None and trial.since_best >= config.patience):
        trial.done, trial.metric = True, None
    elif t >= rung_end:
        trial.deferred = fit.alpha
    else:
        trial.metric = problem.next_metric(config, trial.metric, fit.alpha, fit)
        trial.done = trial.metric is None


@dataclass(frozen=True)
class _Direction:
    vector: Tensor  # [d] float32 unit, original feature space, signed
    eigenvalue: float
    explained: float
    sign_margin: float


def _directions(problem: _Problem, snap: _Snapshot, outputs: Sequence[int]) -> dict[int, _Direction]:
    """Top eigenvector of each output's own uncentred AGOP at a kept fit, signed, in the original space.

    The uncentred AGOP is used whatever center_grads was: centring only shapes the M updates, while the
    steering direction should follow where the class score is sensitive, its mean gradient included.
    Sign: the mean training gradient has a positive component along +direction (sign_margin is their
    cosine). Eigenvalues are for gradients w.r.t. the original features (kernel coords / scale).
    """
    d2 = problem.distances(snap.metric)[0]
    K, s = _kernel(d2, snap.config)
    W = _gradient_weights(K, s, d2, snap.config)
    found = {}
    for c, H in zip(outputs, _gradient_factors(problem.Z, W, snap.alpha, outputs)):
        G = H.double() if snap.metric is None else H.double() @ snap.metric.double()
        evals, evecs = torch.linalg.eigh(G.T @ G / G.shape[0])
        q, top, trace = evecs[:, -1], float(evals[-1]), float(evals.clamp_min(0).sum())
        mean_grad = G.mean(0)
        if float(mean_grad @ q) < 0:
            q = -q
        found[c] = _Direction(vector=problem.features.to_original(q), eigenvalue=top / problem.features.scale**2,
                              explained=top / trace if trace > 0 else float("nan"),
                              sign_margin=float(mean_grad @ q / mean_grad.norm().clamp_min(1e-300)))
    return found


# ------------------------------------------------------------------------------------------------------
# Public entry points


def _device(X: Tensor, search: SearchConfig) -> torch.device:
    return torch.device(search.device) if search.device is not None else X.device


def _check_features(X_tr: Tensor, X_val: Tensor) -> None:
    for name, X in (("X_tr", X_tr), ("X_val", X_val)):
        if not isinstance(X, Tensor) or X.ndim != 2 or not X.is_floating_point():
            raise ValueError(f"{name} must be a float tensor [n, d], got "
                             f"{type(X).__name__}{tuple(X.shape) if isinstance(X, Tensor) else ''}")
        if X.shape[0] == 0:
            raise ValueError(f"{name} is empty")
        if not bool(torch.isfinite(X).all()):
            raise ValueError(f"{name} contains NaN or inf")
    if X_tr.shape[1] != X_val.shape[1]:
        raise ValueError(f"X_tr has {X_tr.shape[1]} features, X_val {X_val.shape[1]}")
    if X_tr.shape[0] < 2:
        raise ValueError("need at least 2 training points")


def _check_labels(labels: Tensor, n: int, num_classes: int, name: str) -> Tensor:
    if not isinstance(labels, Tensor) or labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"{name} must be an integer tensor [{n}]")
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"{name} must hold class indices (an integer tensor), got {labels.dtype}")
    labels = labels.long()
    if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"{name} must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
    return labels


def check_classification_inputs(X_tr: Tensor, labels_tr: Tensor, X_val: Tensor, labels_val: Tensor,
                                num_classes: int, *, every_class_in_val: bool,
                                device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """Validate one layer's classification data; return the labels as int64 on `device` (X_tr's default).

    Raises ValueError naming the problem: shapes, NaN/inf, labels out of range, a class without training
    examples (nothing to fit) and, with every_class_in_val, a class absent from validation or making up
    all of it (its AUC, which selects the probe and weights the layer, would be undefined).
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    _check_features(X_tr, X_val)
    device = X_tr.device if device is None else device
    labels_tr = _check_labels(labels_tr, X_tr.shape[0], num_classes, "labels_tr").to(device)
    labels_val = _check_labels(labels_val, X_val.shape[0], num_classes, "labels_val").to(device)
    counts = torch.bincount(labels_tr, minlength=num_classes)
    if bool((counts == 0).any()):
        missing = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"classes {missing} have no training example: no probe can be fitted for them")
    if every_class_in_val:
        val_counts = torch.bincount(labels_val, minlength=num_classes)
        absent = torch.nonzero((val_counts == 0) | (val_counts == len(labels_val))).flatten().tolist()
        if absent:
            raise ValueError(f"classes {absent} have no validation example (or only those): their AUC, which "
                             "selects the probe and weights the layers, is undefined")
    return labels_tr, labels_val


def _classification_problem(X_tr: Tensor, labels_tr: Tensor, X_val: Tensor, labels_val: Tensor,
                            num_classes: int, search: SearchConfig, multiclass: bool) -> tuple[_Problem, Tensor]:
    device = _device(X_tr, search)
    labels_tr, labels_val = check_classification_inputs(X_tr, labels_tr, X_val, labels_val, num_classes,
                                                        every_class_in_val=not multiclass, device=device)
    onehot = torch.nn.functional.one_hot(labels_val, num_classes).bool()

    def evaluate(scores: Tensor) -> tuple[Key, Tensor | None]:
        auc = roc_auc(scores, onehot)
        mean_auc = float(auc.nanmean())
        if not multiclass:
            return (mean_auc,), auc
        accuracy = float((scores.argmax(1) == labels_val).double().mean())
        return (accuracy, mean_auc), None

    Y = torch.nn.functional.one_hot(labels_tr, num_classes).double()
    problem = _Problem(X_tr.to(device), Y, X_val.to(device), evaluate)
    return problem, labels_val


def fit_binary_directions(X_tr: Tensor, labels_tr: Tensor, X_val: Tensor, labels_val: Tensor, num_classes: int,
                          search: SearchConfig = SearchConfig(), *, keep_predictors: bool = False,
                          shared_metric: bool = True) -> list[ProbeResult]:
    """One-vs-rest RFM directions for every class of one layer's features.

    X_tr [n, d], X_val [m, d] (any float dtype; float16 is fine); labels are class indices. Every class
    needs a training example and must be present (and not alone) in validation. Each class gets the
    (trial, iteration) with its best validation AUC; its direction is the signed top eigenvector of its
    own AGOP there. Returns one ProbeResult per class, in class order.

    shared_metric=True (default): one multi-output search, M learned from the AGOP summed over classes.
    False: the paper's protocol, one binary RFM search per class with its own M (about num_classes times
    the fits; `search_fits` and `failed_trials` are then the totals over the classes' searches, and a
    kept predictor has that class's score in its output 0).
    """
    problem, labels_val = _classification_problem(X_tr, labels_tr, X_val, labels_val, num_classes, search,
                                                  multiclass=False)
    if not shared_metric:
        searches = _per_class_searches(problem, labels_val, num_classes, search)
        fits, failed = sum(o.fits for _, o in searches), sum(len(o.failures) for _, o in searches)
        results = []
        for c, (sub, outcome) in enumerate(searches):
            snap = outcome.per_output[0]
            q = _directions(sub, snap, [0])[0]
            results.append(ProbeResult(
                direction=q.vector, val_auc=outcome.per_output_score[0], config=snap.config,
                best_iteration=snap.iteration, class_index=c, method="rfm", eigenvalue=q.eigenvalue,
                explained=q.explained, sign_margin=q.sign_margin, search_fits=fits,
                predictor=sub.predictor(snap) if keep_predictors else None, output_index=0, failed_trials=failed))
        return results
    outcome = _run_search(problem, search, num_classes)
    if any(snap is None for snap in outcome.per_output):  # every class has validation AUCs (checked above)
        raise ProbeFailure(outcome.failure_summary())
    directions: dict[int, _Direction] = {}
    for snap in {id(s): s for s in outcome.per_output}.values():  # classes sharing a fit share its kernel
        directions.update(_directions(problem, snap, [c for c, s in enumerate(outcome.per_output) if s is snap]))
    results = []
    for c, snap in enumerate(outcome.per_output):
        q = directions[c]
        results.append(ProbeResult(
            direction=q.vector, val_auc=outcome.per_output_score[c], config=snap.config,
            best_iteration=snap.iteration, class_index=c, method="rfm", eigenvalue=q.eigenvalue,
            explained=q.explained, sign_margin=q.sign_margin, search_fits=outcome.fits,
            predictor=problem.predictor(snap) if keep_predictors else None, output_index=c,
            failed_trials=len(outcome.failures)))
    return results


def _per_class_searches(problem: _Problem, labels_val: Tensor, num_classes: int,
                        search: SearchConfig) -> list[tuple[_Problem, _Outcome]]:
    """The paper's protocol: per class a binary (0/1 target) RFM search of its own, so its own M, each
    fit kept by that class's validation AUC. The classes share the features and the M = I distances."""
    positive_val = torch.nn.functional.one_hot(labels_val, num_classes).bool()
    found = []
    for c in range(num_classes):
        def evaluate(scores: Tensor, c: int = c) -> tuple[Key, Tensor | None]:
            auc = roc_auc(scores[:, 0], positive_val[:, c])
            return (float(auc),), auc.reshape(1)

        sub = problem.with_targets(problem.Y[:, c:c + 1], evaluate)
        outcome = _run_search(sub, search, 1)
        if outcome.per_output[0] is None:
            raise ProbeFailure(f"class {c}: {outcome.failure_summary()}")
        found.append((sub, outcome))
    return found


def fit_multiclass(X_tr: Tensor, labels_tr: Tensor, X_val: Tensor, labels_val: Tensor, num_classes: int,
                   search: SearchConfig = SearchConfig(), *, shared_metric: bool = True) -> Classifier:
    """Multiclass RFM (one-hot targets, one shared M), kept by validation accuracy (ties: mean AUC).

    shared_metric=False: the paper's binary probes read as one classifier, one RFM per class with its own
    M (each kept by its own validation AUC), predicting the class whose binary score is highest. Every
    class must then be present (and not alone) in validation, as for fit_binary_directions."""
    if not shared_metric:
        problem, labels_val = _classification_problem(X_tr, labels_tr, X_val, labels_val, num_classes, search,
                                                      multiclass=False)
        searches = _per_class_searches(problem, labels_val, num_classes, search)
        stack = PredictorStack(tuple(sub.predictor(o.per_output[0]) for sub, o in searches))
        scores = stack.scores(X_val)
        accuracy = float((scores.argmax(1).to(labels_val.device) == labels_val).double().mean())
        return Classifier(predictor=stack, temperature=fit_temperature(scores, labels_val), val_accuracy=accuracy,
                          val_auc=float(np.mean([o.per_output_score[0] for _, o in searches])),
                          search_fits=sum(o.fits for _, o in searches),
                          failed_trials=sum(len(o.failures) for _, o in searches))
    problem, labels_val = _classification_problem(X_tr, labels_tr, X_val, labels_val, num_classes, search,
                                                  multiclass=True)
    outcome = _run_search(problem, search, num_classes)
    if outcome.best is None:
        raise ProbeFailure(outcome.failure_summary())
    predictor = problem.predictor(outcome.best)
    scores = predictor.scores(X_val)
    accuracy, mean_auc = outcome.best.key
    return Classifier(predictor=predictor, temperature=fit_temperature(scores, labels_val),
                      val_accuracy=accuracy, val_auc=mean_auc, search_fits=outcome.fits,
                      failed_trials=len(outcome.failures))


def fit_regression(X_tr: Tensor, y_tr: Tensor, X_val: Tensor, y_val: Tensor,
                   search: SearchConfig = SearchConfig()) -> Regressor:
    """RFM regression on the z-scored target (e.g. tempo in BPM), kept by validation MSE."""
    _check_features(X_tr, X_val)
    device = _device(X_tr, search)
    for name, y, n in (("y_tr", y_tr, X_tr.shape[0]), ("y_val", y_val, X_val.shape[0])):
        if not isinstance(y, Tensor) or y.ndim != 1 or y.shape[0] != n:
            raise ValueError(f"{name} must be a tensor [{n}]")
        if not bool(torch.isfinite(y.double()).all()):
            raise ValueError(f"{name} contains NaN or inf")
    y_tr, y_val = y_tr.to(device, torch.float64), y_val.to(device, torch.float64)
    mean, std = float(y_tr.mean()), float(y_tr.std(correction=0))
    if not std > 0:
        raise ValueError("y_tr is constant: there is nothing to regress")
    z_val = (y_val - mean) / std

    def evaluate(scores: Tensor) -> tuple[Key, Tensor | None]:
        return (-float((scores[:, 0] - z_val).square().mean()),), None

    problem = _Problem(X_tr.to(device), ((y_tr - mean) / std)[:, None], X_val.to(device), evaluate)
    outcome = _run_search(problem, search, 1)
    snap = outcome.best
    if snap is None:
        raise ProbeFailure(outcome.failure_summary())
    q = _directions(problem, snap, [0])[0]
    mse = -snap.key[0]
    variance = float(z_val.var(correction=0))
    return Regressor(predictor=problem.predictor(snap), target_mean=mean, target_std=std, direction=q.vector,
                     eigenvalue=q.eigenvalue, explained=q.explained, sign_margin=q.sign_margin, val_mse=mse,
                     val_r2=1.0 - mse / variance if variance > 0 else float("nan"), search_fits=outcome.fits,
                     failed_trials=len(outcome.failures))


# ------------------------------------------------------------------------------------------------------
# The multi-layer aggregation probe (paper App. B, "aggregation model")


@dataclass(frozen=True, eq=False)
class LayerProjection:
    """One layer's part of the aggregated features: the standardised features projected on the top
    `components` eigenvectors of the layer probe's AGOP (summed over classes, at its kept fit)."""

    features: FeatureMap
    basis: Tensor  # [r, k] float32, orthonormal columns in kernel coordinates, by decreasing eigenvalue
    eigenvalues: Tensor  # [k] float64, in kernel coordinates

    @classmethod
    def from_predictor(cls, predictor: KernelPredictor, components: int) -> LayerProjection:
        evals, evecs = torch.linalg.eigh(predictor.agop())
        k = min(components, evecs.shape[1])
        return cls(predictor.features, evecs[:, -k:].flip(1).to(torch.float32).contiguous(), evals[-k:].flip(0))

    def __call__(self, X: Tensor) -> Tensor:
        """[m, k] float32: coordinates of X along the layer's top AGOP eigenvectors."""
        return self.features(X)[0] @ self.basis.to(self.features.mean.device)


@dataclass(frozen=True, eq=False)
class AggregatedClassifier:
    """The paper's aggregation model: an RFM on the concatenated per-layer AGOP projections.

    `layers` are positions in the list of per-layer features passed to fit_aggregated (and to predict);
    layers whose probe could not be fitted are left out."""

    layers: tuple[int, ...]
    projections: tuple[LayerProjection, ...]
    classifier: Classifier
    skipped: tuple[tuple[int, str], ...] = ()  # (position, reason) of layers without a probe

    @property
    def val_accuracy(self) -> float:
        return self.classifier.val_accuracy

    @property
    def val_auc(self) -> float:
        return self.classifier.val_auc

    def features(self, per_layer: Sequence[Tensor]) -> Tensor:
        """[m, sum of k] the aggregation model's input, from the per-layer features (same list as at fit)."""
        return torch.cat([p(per_layer[j]) for j, p in zip(self.layers, self.projections)], dim=1)

    def predict(self, per_layer: Sequence[Tensor]) -> Tensor:
        return self.classifier.predict(self.features(per_layer))

    def predict_proba(self, per_layer: Sequence[Tensor]) -> Tensor:
        return self.classifier.predict_proba(self.features(per_layer))


def fit_aggregated(layers_tr: Sequence[Tensor], labels_tr: Tensor, layers_val: Sequence[Tensor], labels_val: Tensor,
                   num_classes: int, search: SearchConfig = SearchConfig(), *, components: int = 8,
                   aggregator_search: SearchConfig | None = None,
                   layer_probes: Sequence[Classifier | None] | None = None) -> AggregatedClassifier:
    """The paper's multi-layer aggregation probe (App. B: "number of components", "aggregation model").

    Per layer a multiclass RFM (shared M, `search`; or the given `layer_probes`, None where a layer has no
    probe) is fitted on its features; its AGOP at the kept fit (summed over classes) gives the top
    `components` eigenvectors (the first is what a binary probe steers with); each layer's features are
    projected on them, the projections are concatenated over layers, and one more multiclass RFM (the
    aggregation model) is searched on that, kept by validation accuracy as the paper does.
    `aggregator_search` defaults to `search` with 3x the trials (the paper: 300 vs 100) and seed + 1.
    The paper also searches an l_p kernel K_{p,q} for the aggregation model; here it is K_{2,q}.
    """
    if len(layers_tr) != len(layers_val) or not layers_tr:
        raise ValueError(f"need the same number (>= 1) of training and validation layers, got "
                         f"{len(layers_tr)} and {len(layers_val)}")
    if components < 1:
        raise ValueError(f"components must be >= 1, got {components}")
    if layer_probes is not None and len(layer_probes) != len(layers_tr):
        raise ValueError(f"layer_probes has {len(layer_probes)} entries for {len(layers_tr)} layers")
    used, projections, skipped = [], [], []
    for j, (X, Xv) in enumerate(zip(layers_tr, layers_val)):
        probe = layer_probes[j] if layer_probes is not None else None
        if probe is None:
            try:
                probe = fit_multiclass(X, labels_tr, Xv, labels_val, num_classes, search)
            except ProbeFailure as exc:
                skipped.append((j, str(exc)))
                continue
        if not isinstance(probe.predictor, KernelPredictor):
            raise ValueError("layer_probes must be shared-M classifiers (one KernelPredictor each)")
        used.append(j)
        projections.append(LayerProjection.from_predictor(probe.predictor, components))
    if not used:
        raise ProbeFailure(f"no layer could be probed for the aggregation model (e.g. {skipped[0][1]})")
    if aggregator_search is None:
        aggregator_search = replace(search, trials=3 * search.trials, seed=search.seed + 1)
    A_tr = torch.cat([p(layers_tr[j]) for j, p in zip(used, projections)], dim=1)
    A_val = torch.cat([p(layers_val[j]) for j, p in zip(used, projections)], dim=1)
    classifier = fit_multiclass(A_tr, labels_tr, A_val, labels_val, num_classes, aggregator_search)
    return AggregatedClassifier(tuple(used), tuple(projections), classifier, tuple(skipped))
