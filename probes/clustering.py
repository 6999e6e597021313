"""The clustering-index layer choice of the linear-probe steering method (activation-steering summary, Sec. III):
per layer, k-means on the pooled features with k = the number of classes, scored against the labels with the
adjusted Rand index (ARI) and normalised mutual information (NMI); the layer where the unsupervised clusters
agree best with the concept's classes is the one to steer at.

Which index picks the layer: the summary names both without saying how they combine, so we pick by **ARI**
(it is corrected for chance: a random partition scores ~0 whatever k and n are, while NMI rises with k and
small n), NMI breaking ties, then the lower layer.

Everything here is small and dependency-free (torch only): k-means with k-means++ seeding and restarts,
both indices from the contingency table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["KMeansResult", "LayerClustering", "adjusted_rand_index", "choose_layer", "contingency",
           "kmeans", "normalized_mutual_info"]

CHOICE_INDEX = "ari"  # the index that picks the layer (NMI breaks ties)


@dataclass(frozen=True)
class KMeansResult:
    labels: torch.Tensor  # [n] cluster of each point (long)
    centers: torch.Tensor  # [k, d] float64
    inertia: float  # sum of squared distances to the assigned centres
    iterations: int  # of the kept restart


def _sq_dists(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return ((x * x).sum(1, keepdim=True) - 2 * x @ c.T + (c * c).sum(1)[None]).clamp_min(0)


def _plus_plus(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): each new centre drawn with probability proportional to
    the squared distance to the nearest centre chosen so far."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=gen))
    centers = [x[first]]
    d2 = _sq_dists(x, x[first][None])[:, 0]
    for _ in range(1, k):
        total = float(d2.sum())
        # All remaining points sit on a centre (duplicates): any point will do.
        probs = d2 / total if total > 0 else torch.full_like(d2, 1.0 / n)
        i = int(torch.multinomial(probs, 1, generator=gen))
        centers.append(x[i])
        d2 = torch.minimum(d2, _sq_dists(x, x[i][None])[:, 0])
    return torch.stack(centers)


def kmeans(x: torch.Tensor, k: int, *, seed: int = 0, restarts: int = 4, max_iter: int = 100,
           tol: float = 1e-8) -> KMeansResult:
    """Lloyd's k-means on x [n, d] (computed in float64), k-means++ seeding, `restarts` seeded runs, the one with
    the lowest inertia kept. Deterministic for (x, k, seed, restarts)."""
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"k-means needs a non-empty [n, d] matrix, got shape {tuple(x.shape)}")
    if not 1 <= k <= x.shape[0]:
        raise ValueError(f"k must be in [1, n={x.shape[0]}], got {k}")
    if restarts < 1 or max_iter < 1:
        raise ValueError("restarts and max_iter must be >= 1")
    x = x.detach().double().cpu()
    if not bool(torch.isfinite(x).all()):
        raise ValueError("k-means features contain NaN or inf")
    gen = torch.Generator().manual_seed(seed)
    best: KMeansResult | None = None
    for _ in range(restarts):
        centers = _plus_plus(x, k, gen)
        labels = torch.zeros(x.shape[0], dtype=torch.long)
        it = 0
        for it in range(1, max_iter + 1):
            labels = _sq_dists(x, centers).argmin(1)
            counts = torch.bincount(labels, minlength=k)
            sums = torch.zeros_like(centers).index_add_(0, labels, x)
            moved = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centers)
            empty = (counts == 0).nonzero().flatten()
            if empty.numel():  # an empty cluster takes the points farthest from their centres
                far = _sq_dists(x, moved).min(1).values.argsort(descending=True)
                moved[empty] = x[far[: empty.numel()]]
            shift = float((moved - centers).pow(2).sum())
            centers = moved
            if shift <= tol * max(1.0, float(centers.pow(2).sum())):
                break
        labels = _sq_dists(x, centers).argmin(1)
        inertia = float(_sq_dists(x, centers).gather(1, labels[:, None]).sum())
        if best is None or inertia < best.inertia:
            best = KMeansResult(labels, centers, inertia, it)
    assert best is not None
    return best


def contingency(a: Sequence[int] | torch.Tensor, b: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """[|A|, |B|] counts of points with label pair (a_i, b_j); labels are any integers (relabelled densely)."""
    a, b = torch.as_tensor(a).long().flatten(), torch.as_tensor(b).long().flatten()
    if a.shape != b.shape or a.numel() == 0:
        raise ValueError(f"two non-empty labelings of the same points are needed, got {a.numel()} and {b.numel()}")
    _, ai = torch.unique(a, return_inverse=True)
    _, bi = torch.unique(b, return_inverse=True)
    table = torch.zeros(int(ai.max()) + 1, int(bi.max()) + 1, dtype=torch.float64)
    table.index_put_((ai, bi), torch.ones(a.numel(), dtype=torch.float64), accumulate=True)
    return table


def _pairs(x: torch.Tensor) -> torch.Tensor:
    return x * (x - 1) / 2


def adjusted_rand_index(a, b) -> float:
    """Hubert & Arabie's ARI: 1 for identical partitions (up to renaming), ~0 for independent ones (can be < 0)."""
    table = contingency(a, b)
    n = float(table.sum())
    index = float(_pairs(table).sum())
    rows, cols = float(_pairs(table.sum(1)).sum()), float(_pairs(table.sum(0)).sum())
    expected = rows * cols / _pairs(torch.tensor(n)).item() if n > 1 else 0.0
    top = 0.5 * (rows + cols)
    if top == expected:  # both partitions trivial (one cluster each, or all singletons): they agree
        return 1.0
    return (index - expected) / (top - expected)


def _entropy(counts: torch.Tensor) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def normalized_mutual_info(a, b) -> float:
    """Mutual information over the arithmetic mean of the two entropies (natural log; in [0, 1]); two trivial
    partitions (a single cluster each) count as identical, 1."""
    table = contingency(a, b)
    n = table.sum()
    h_a, h_b = _entropy(table.sum(1)), _entropy(table.sum(0))
    if h_a == 0 and h_b == 0:
        return 1.0
    p = table / n
    outer = p.sum(1, keepdim=True) * p.sum(0, keepdim=True)
    nz = p > 0
    mi = float((p[nz] * (p[nz] / outer[nz]).log()).sum())
    return max(0.0, mi / (0.5 * (h_a + h_b)))


@dataclass(frozen=True)
class LayerClustering:
    """One layer's agreement between k-means clusters and the labels."""

    layer: int
    ari: float
    nmi: float


def cluster_layer(layer: int, x: torch.Tensor, labels: torch.Tensor, num_classes: int, seed: int = 0,
                  restarts: int = 4) -> LayerClustering:
    """k-means (k = num_classes) on one layer's features [n, d], scored against the labels [n]."""
    found = kmeans(x, num_classes, seed=seed, restarts=restarts)
    return LayerClustering(layer, adjusted_rand_index(found.labels, labels),
                           normalized_mutual_info(found.labels, labels))


def choose_layer(scores: Sequence[LayerClustering]) -> LayerClustering:
    """The layer with the highest ARI (NMI breaks ties, then the lower layer)."""
    if not scores:
        raise ValueError("no layer to choose from")
    return max(scores, key=lambda s: (round(s.ari, 12), round(s.nmi, 12), -s.layer))
