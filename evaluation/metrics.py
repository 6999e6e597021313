"""Distribution metrics between two sets of embeddings: Fréchet distance and unbiased MMD².

Both compare a set of generated clips with a reference set, each clip represented by one embedding
vector (`musicrfm.evaluation.embedding`). The numbers mean something only for a fixed embedding: report the
embedder's name with every value (CLAP FD is not log-mel FD), and the sample sizes (both metrics
depend on them; see docs/evaluation.md).

  frechet_distance(x, y)                   FD of Gaussians fit to x [n, d] and y [m, d]
  frechet_distance_gaussians(mu1, S1, mu2, S2)
  RBFKernel(bandwidth), RBFKernel.from_reference(ref)   median heuristic, then frozen
  mmd2_unbiased(x, y, kernel)              the unbiased U-statistic (diagonal terms excluded)

Everything is computed in float64 with numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "RBFKernel",
    "frechet_distance",
    "frechet_distance_gaussians",
    "gaussian_stats",
    "mmd2_unbiased",
]


def _samples(x, name: str, min_samples: int = 2) -> np.ndarray:
    """A finite float64 [n, d] array with n >= min_samples, or a ValueError naming `name`."""
    array = np.asarray(x, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [samples, dims], got shape {array.shape}")
    n, d = array.shape
    if d == 0:
        raise ValueError(f"{name} has 0 dimensions")
    if n < min_samples:
        raise ValueError(f"{name} has {n} sample(s); at least {min_samples} are needed")
    if not np.all(np.isfinite(array)):
        bad = int(np.count_nonzero(~np.isfinite(array).all(axis=1)))
        raise ValueError(f"{name} contains NaN or infinite values ({bad} of {n} rows)")
    return array


def _same_dims(x: np.ndarray, y: np.ndarray, names: tuple[str, str] = ("x", "y")) -> None:
    if x.shape[1] != y.shape[1]:
        raise ValueError(
            f"dimension mismatch: {names[0]} has {x.shape[1]} dims, {names[1]} has {y.shape[1]} "
            f"(embeddings from different embedders cannot be compared)"
        )


# --------------------------------------------------------------------------------------------
# Fréchet distance


def gaussian_stats(x) -> tuple[np.ndarray, np.ndarray]:
    """Mean [d] and unbiased covariance [d, d] (divisor n - 1) of samples [n, d], float64."""
    x = _samples(x, "samples")
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (eigenvalues clipped at 0)."""
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance_gaussians(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet (2-Wasserstein²) distance between N(mu1, S1) and N(mu2, S2):

        ||mu1 - mu2||² + Tr(S1) + Tr(S2) - 2 Tr((S1^½ S2 S1^½)^½)

    Tr((S1^½ S2 S1^½)^½) equals Tr((S1 S2)^½) (the product's eigenvalues are the same) but is
    computed from two symmetric eigendecompositions, which is stable: S1^½ from eigh(S1) with
    eigenvalues clipped at 0, then the eigenvalues of the symmetric PSD S1^½ S2 S1^½, clipped at 0,
    square-rooted and summed. No general (non-symmetric) matrix square root, no complex parts to
    discard. The result is clipped at 0 (rounding can leave -1e-15 for identical inputs).
    """
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    s1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    s2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    d = mu1.shape[0]
    if mu1.ndim != 1 or mu2.shape != (d,):
        raise ValueError(f"means must be vectors of one length, got shapes {mu1.shape} and {mu2.shape}")
    if s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"covariances must be [{d}, {d}], got {s1.shape} and {s2.shape}")
    for name, value in (("mu1", mu1), ("mu2", mu2), ("sigma1", s1), ("sigma2", s2)):
        if not np.all(np.isfinite(value)):
            raise ValueError(f"{name} contains NaN or infinite values")
    s1 = 0.5 * (s1 + s1.T)
    s2 = 0.5 * (s2 + s2.T)
    root1 = _psd_sqrt(s1)
    middle = root1 @ s2 @ root1
    eigenvalues = np.linalg.eigvalsh(0.5 * (middle + middle.T))
    trace_sqrt = float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt)
    return max(value, 0.0)


def frechet_distance(x, y) -> float:
    """Fréchet distance between Gaussians fit to embeddings x [n, d] and y [m, d] (n, m >= 2).

    The mean and the unbiased covariance of each set go into `frechet_distance_gaussians`. FD is
    symmetric and 0 for a set against itself. The plug-in estimate is biased (typically upward;
    the mean term alone by Tr(S1)/n + Tr(S2)/m) by terms that shrink like 1/n: compare FDs only
    at equal sample sizes, and expect noise when n is not well above d (with n <= d the covariance is singular; the eigenvalue clipping
    keeps the number finite but it is then mostly bias).
    """
    x = _samples(x, "x")
    y = _samples(y, "y")
    _same_dims(x, y)
    mu1, s1 = gaussian_stats(x)
    mu2, s2 = gaussian_stats(y)
    return frechet_distance_gaussians(mu1, s1, mu2, s2)


# --------------------------------------------------------------------------------------------
# MMD


@dataclass(frozen=True)
class RBFKernel:
    """Gaussian RBF kernel k(a, b) = exp(-||a - b||² / (2 bandwidth²)).

    Frozen: build it once per reference set (`from_reference`) and pass the same object to every
    `mmd2_unbiased` against that reference, so every comparison uses one bandwidth (a bandwidth
    re-estimated per comparison would make the values incomparable).
    """

    bandwidth: float

    def __post_init__(self) -> None:
        if not (np.isfinite(self.bandwidth) and self.bandwidth > 0):
            raise ValueError(f"bandwidth must be a positive finite number, got {self.bandwidth!r}")

    @classmethod
    def from_reference(cls, reference, *, max_samples: int | None = 2000, seed: int = 0) -> RBFKernel:
        """Median heuristic: bandwidth = the median Euclidean distance between distinct reference
        points (all pairs i < j). Above `max_samples` points a seeded random subset of that size
        is used (the median of ~2 million pairs is stable; the result is deterministic)."""
        ref = _samples(reference, "reference")
        if max_samples is not None and len(ref) > max_samples:
            keep = np.sort(np.random.default_rng(seed).choice(len(ref), max_samples, replace=False))
            ref = ref[keep]
        d2 = _squared_distances(ref, ref)
        upper = d2[np.triu_indices(len(ref), k=1)]
        median = float(np.sqrt(np.median(upper)))
        if not median > 0:
            raise ValueError("the median distance between reference points is 0 (most points are identical)")
        return cls(bandwidth=median)

    def __call__(self, a, b) -> np.ndarray:
        """The Gram matrix [len(a), len(b)]."""
        a = np.asarray(a, dtype=np.float64)
        b = np.asarray(b, dtype=np.float64)
        return np.exp(-_squared_distances(a, b) / (2.0 * self.bandwidth**2))


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d2 = (a * a).sum(axis=1)[:, None] + (b * b).sum(axis=1)[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d2, 0.0)


def _kernel_sum(kernel: RBFKernel, a: np.ndarray, b: np.ndarray, *, skip_diagonal: bool = False,
                block: int = 1024) -> float:  # fmt: skip
    """sum_ij k(a_i, b_j) in row blocks (memory: block x len(b)); with `skip_diagonal` (a is b)
    the i == j terms are left out."""
    total = 0.0
    for start in range(0, len(a), block):
        gram = kernel(a[start : start + block], b)
        if skip_diagonal:
            rows = np.arange(gram.shape[0])
            gram[rows, start + rows] = 0.0
        total += float(gram.sum())
    return total


def mmd2_unbiased(x, y, kernel: RBFKernel) -> float:
    """Unbiased estimate of MMD² between the distributions of x [n, d] and y [m, d] (n, m >= 2):

        1/(n(n-1)) sum_{i != j} k(x_i, x_j) + 1/(m(m-1)) sum_{i != j} k(y_i, y_j)
            - 2/(n m) sum_{i, j} k(x_i, y_j)

    (Gretton et al. 2012, the U-statistic). The diagonal terms k(x_i, x_i) = 1 are excluded,
    which makes the expectation exactly MMD² (0 when x and y come from the same distribution);
    a single value can therefore be negative. `kernel` is required so that the bandwidth is
    fixed by the caller (`RBFKernel.from_reference` on the reference set, reused).
    """
    if not isinstance(kernel, RBFKernel):
        raise TypeError(
            f"kernel must be an RBFKernel (e.g. RBFKernel.from_reference(ref)), got {type(kernel).__name__}"
        )
    x = _samples(x, "x")
    y = _samples(y, "y")
    _same_dims(x, y)
    n, m = len(x), len(y)
    xx = _kernel_sum(kernel, x, x, skip_diagonal=True) / (n * (n - 1))
    yy = _kernel_sum(kernel, y, y, skip_diagonal=True) / (m * (m - 1))
    xy = _kernel_sum(kernel, x, y) / (n * m)
    return xx + yy - 2.0 * xy
