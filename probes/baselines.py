"""Linear baselines for the RFM probes, from the same features and exported the same way (ProbeResult).

  linear probe      ridge regression (MSE) of one-vs-rest +-1 targets on the centred features, closed form:
                    the "second method" of the activation-steering work (an MSE probe keeps the direction
                    information a softmax would squash). The unit weight vector is the direction; +w raises
                    the class score by construction. The ridge is picked per class by validation AUC on a
                    grid relative to the largest eigenvalue of the centred Gram matrix, all from one
                    symmetric eigendecomposition (of X^T X or X X^T, whichever is smaller).
  difference of     mean of the class minus mean of the rest, normalised.
  means
  multiclass        `fit_linear_multiclass`: ridge on one-hot targets with an intercept, argmax; the
                    "linear probe" row of the classification report (ridge picked by validation accuracy).

Computation runs in float64 on the features' device; directions are float32 unit vectors in the original
feature space. Validation AUCs come from the linear scores x . w, never from hard labels. Features with
nothing to probe raise rfm.DegenerateFeatures (a ValueError and a ProbeFailure: training reports the layer
and goes on).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .rfm import DegenerateFeatures, ProbeResult, check_classification_inputs, fit_temperature, roc_auc

__all__ = ["DEFAULT_RIDGE_GRID", "LinearClassifier", "LinearRegressor", "fit_linear_directions",
           "fit_linear_multiclass", "fit_linear_regression", "fit_mean_difference"]

# Ridge lambda as a fraction of the largest eigenvalue of the centred Gram matrix.
DEFAULT_RIDGE_GRID: tuple[float, ...] = tuple(10.0**-k for k in range(9))


@dataclass(frozen=True, eq=False)
class LinearClassifier:
    """Ridge probe on one-hot targets: scores = X W + b; softmax with a validation-fitted temperature."""

    weight: Tensor  # [d, C] float32
    bias: Tensor  # [C] float32
    temperature: float
    ridge: float
    val_accuracy: float
    val_auc: float  # mean one-vs-rest AUC over classes present in validation

    def scores(self, X: Tensor) -> Tensor:
        return X.to(self.weight.device, torch.float32) @ self.weight + self.bias

    def predict_proba(self, X: Tensor) -> Tensor:
        return torch.softmax(self.scores(X).double() / self.temperature, dim=1).to(torch.float32)

    def predict(self, X: Tensor) -> Tensor:
        return self.scores(X).argmax(dim=1)


class _RidgePath:
    """Ridge solutions W(lam) = (Xc^T Xc + lam I)^-1 Xc^T Y for many lam from one eigendecomposition."""

    def __init__(self, X: Tensor, Y: Tensor):
        X = X.double()
        self.mean = X.mean(0)
        Xc = X - self.mean
        n, d = Xc.shape
        self.primal = n >= d
        if self.primal:  # Xc^T Xc = V diag(e) V^T;  W = V diag(1/(e+lam)) V^T Xc^T Y
            e, V = torch.linalg.eigh(Xc.T @ Xc)
            self.left, self.right = V, V.T @ (Xc.T @ Y)
        else:  # Xc Xc^T = U diag(e) U^T;  W = Xc^T U diag(1/(e+lam)) U^T Y
            e, U = torch.linalg.eigh(Xc @ Xc.T)
            self.left, self.right = Xc.T @ U, U.T @ Y
        self.eigenvalues = e.clamp_min(0.0)
        self.top = float(self.eigenvalues.max())
        if not self.top > 0:
            raise DegenerateFeatures("all training feature vectors are identical: there is nothing to probe")

    def weights(self, relative_ridge: float) -> Tensor:
        """W [d, c] for lam = relative_ridge * (largest eigenvalue)."""
        return self.left @ (self.right / (self.eigenvalues + relative_ridge * self.top)[:, None])


def _as_float64(X: Tensor) -> Tensor:
    return X.to(torch.float64)


def fit_linear_directions(X_tr: Tensor, labels_tr: Tensor, X_val: Tensor, labels_val: Tensor, num_classes: int,
                          *, ridge_grid: Sequence[float] = DEFAULT_RIDGE_GRID) -> list[ProbeResult]:
    """One-vs-rest ridge (MSE) probes: one unit direction per class, ridge chosen by validation AUC."""
    labels_tr, labels_val = check_classification_inputs(X_tr, labels_tr, X_val, labels_val, num_classes,
                                                        every_class_in_val=True)
    if not ridge_grid or min(ridge_grid) <= 0:
        raise ValueError(f"ridge_grid must hold positive values, got {ridge_grid}")
    Y = 2.0 * torch.nn.functional.one_hot(labels_tr, num_classes).double() - 1.0
    path = _RidgePath(X_tr, Y)
    Xv = _as_float64(X_val) - path.mean
    positive = torch.nn.functional.one_hot(labels_val, num_classes).bool()
    best_auc = torch.full((num_classes,), -1.0, dtype=torch.float64, device=Xv.device)
    best_w = torch.zeros(X_tr.shape[1], num_classes, dtype=torch.float64, device=Xv.device)
    best_ridge = [float("nan")] * num_classes
    for ridge in ridge_grid:
        W = path.weights(ridge)
        auc = roc_auc(Xv @ W, positive)
        better = auc > best_auc  # the first (largest) ridge wins ties: the most regular probe
        best_auc = torch.where(better, auc, best_auc)
        best_w[:, better] = W[:, better]
        for c in torch.nonzero(better).flatten().tolist():
            best_ridge[c] = float(ridge)
    results = []
    for c in range(num_classes):
        w = best_w[:, c]
        if not float(w.norm()) > 0:
            raise DegenerateFeatures(f"class {c}: the ridge weight vector is zero (features carry no variance)")
        results.append(ProbeResult(direction=(w / w.norm()).to(torch.float32), val_auc=float(best_auc[c]),
                                   config=None, best_iteration=0, class_index=c, method="linear",
                                   sign_margin=1.0, ridge=best_ridge[c]))
    return results


def fit_mean_difference(X_tr: Tensor, labels_tr: Tensor, X_val: Tensor, labels_val: Tensor,
                        num_classes: int) -> list[ProbeResult]:
    """Difference of means (class mean minus the mean of the other classes' points), normalised."""
    labels_tr, labels_val = check_classification_inputs(X_tr, labels_tr, X_val, labels_val, num_classes,
                                                        every_class_in_val=True)
    X = _as_float64(X_tr)
    Xv = _as_float64(X_val)
    positive = torch.nn.functional.one_hot(labels_val, num_classes).bool()
    onehot = torch.nn.functional.one_hot(labels_tr, num_classes).double()  # [n, C]
    counts = onehot.sum(0)
    class_means = (onehot.T @ X) / counts[:, None]
    rest_means = (X.sum(0) - onehot.T @ X) / (X.shape[0] - counts)[:, None]
    directions = class_means - rest_means  # [C, d]
    norms = directions.norm(dim=1)
    if bool((norms == 0).any()):
        flat = torch.nonzero(norms == 0).flatten().tolist()
        raise DegenerateFeatures(f"classes {flat}: class mean equals the rest's mean, there is no direction")
    directions = directions / norms[:, None]
    auc = roc_auc(Xv @ directions.T, positive)
    return [ProbeResult(direction=directions[c].to(torch.float32), val_auc=float(auc[c]), config=None,
                        best_iteration=0, class_index=c, method="mean_difference", sign_margin=1.0)
            for c in range(num_classes)]


def fit_linear_multiclass(X_tr: Tensor, labels_tr: Tensor, X_val: Tensor, labels_val: Tensor, num_classes: int,
                          *, ridge_grid: Sequence[float] = DEFAULT_RIDGE_GRID) -> LinearClassifier:
    """Ridge regression on one-hot targets (with intercept), ridge chosen by validation accuracy (ties:
    mean one-vs-rest AUC, then the larger ridge)."""
    labels_tr, labels_val = check_classification_inputs(X_tr, labels_tr, X_val, labels_val, num_classes,
                                                        every_class_in_val=False)
    if not ridge_grid or min(ridge_grid) <= 0:
        raise ValueError(f"ridge_grid must hold positive values, got {ridge_grid}")
    Y = torch.nn.functional.one_hot(labels_tr, num_classes).double()
    path = _RidgePath(X_tr, Y)
    Xv = _as_float64(X_val) - path.mean
    positive = torch.nn.functional.one_hot(labels_val, num_classes).bool()
    y_mean = Y.mean(0)
    best = None
    for ridge in ridge_grid:
        W = path.weights(ridge)
        scores = Xv @ W + y_mean
        key = (float((scores.argmax(1) == labels_val).double().mean()), float(roc_auc(scores, positive).nanmean()))
        if best is None or key > best[0]:
            best = (key, ridge, W, scores)
    (accuracy, mean_auc), ridge, W, scores = best
    bias = y_mean - path.mean @ W  # scores on raw X: X W + (y_mean - mean W)
    return LinearClassifier(weight=W.to(torch.float32), bias=bias.to(torch.float32),
                            temperature=fit_temperature(scores, labels_val), ridge=float(ridge),
                            val_accuracy=accuracy, val_auc=mean_auc)


@dataclass(frozen=True, eq=False)
class LinearRegressor:
    """Ridge regression of a numeric target (e.g. tempo in BPM); `direction`: + raises the target."""

    weight: Tensor  # [d] float32
    bias: float
    ridge: float
    val_r2: float

    @property
    def direction(self) -> Tensor:
        return self.weight / self.weight.norm()

    def predict(self, X: Tensor) -> Tensor:
        return X.to(self.weight.device, torch.float32) @ self.weight + self.bias


def fit_linear_regression(X_tr: Tensor, y_tr: Tensor, X_val: Tensor, y_val: Tensor, *,
                          ridge_grid: Sequence[float] = DEFAULT_RIDGE_GRID) -> LinearRegressor:
    """Ridge regression with intercept, ridge chosen by validation R^2 (ties: the larger ridge)."""
    y = y_tr.to(X_tr.device, torch.float64)
    yv = y_val.to(X_val.device, torch.float64)
    if not float(y.std()) > 0:
        raise ValueError("y_tr is constant: there is nothing to regress")
    path = _RidgePath(X_tr, (y - y.mean())[:, None])
    Xv = _as_float64(X_val) - path.mean
    best = None
    for ridge in ridge_grid:
        w = path.weights(ridge)[:, 0]
        pred = Xv @ w + y.mean()
        r2 = float(1 - (pred - yv).square().sum() / (yv - yv.mean()).square().sum())
        if best is None or r2 > best[0]:
            best = (r2, ridge, w)
    r2, ridge, w = best
    bias = float(y.mean() - path.mean @ w)
    return LinearRegressor(weight=w.to(torch.float32), bias=bias, ridge=float(ridge), val_r2=r2)
