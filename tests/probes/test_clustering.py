"""The clustering-index layer choice: k-means, ARI and NMI against hand-computed values, the planted layer."""

import pytest
import torch

from musicrfm.probes.clustering import (LayerClustering, adjusted_rand_index, choose_layer, cluster_layer, kmeans,
                                        normalized_mutual_info)


def test_ari_and_nmi_match_hand_computed_values():
    # a = {0,1 | 2,3}, b = {0,1 | 2 | 3}: contingency [[2,0,0],[0,1,1]]. Pairs: index 1, rows 2, cols 1 of C(4,2) = 6;
    # expected 2*1/6 = 1/3, max (2+1)/2 = 1.5: ARI (1 - 1/3) / (1.5 - 1/3) = 4/7. b refines a, so MI = H(a) = ln 2;
    # H(b) = 1.5 ln 2: NMI = ln 2 / (0.5 * 2.5 ln 2) = 0.8.
    assert adjusted_rand_index([0, 0, 1, 1], [0, 0, 1, 2]) == pytest.approx(4 / 7)
    assert normalized_mutual_info([0, 0, 1, 1], [0, 0, 1, 2]) == pytest.approx(0.8)
    # Crossed halves: index 0, rows = cols = 2, expected 4/6: ARI (0 - 2/3) / (2 - 2/3) = -0.5; independent: NMI 0.
    assert adjusted_rand_index([0, 1, 0, 1], [0, 0, 1, 1]) == pytest.approx(-0.5)
    assert normalized_mutual_info([0, 1, 0, 1], [0, 0, 1, 1]) == pytest.approx(0.0, abs=1e-12)
    # Renamed clusters are the same partition.
    assert adjusted_rand_index([0, 0, 1, 1, 2], [7, 7, 3, 3, 5]) == 1.0
    assert normalized_mutual_info([0, 0, 1, 1, 2], [7, 7, 3, 3, 5]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same points"):
        adjusted_rand_index([0, 1], [0, 1, 2])


def _planted(n_per_class=20, classes=3, d=8, spread=10.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=gen) * spread
    y = torch.arange(classes).repeat_interleave(n_per_class)
    return centres[y] + torch.randn(len(y), d, generator=gen), y


def test_kmeans_finds_separated_clusters_and_is_seeded():
    x, y = _planted()
    found = kmeans(x, 3, seed=1)
    assert adjusted_rand_index(found.labels, y) == 1.0
    again = kmeans(x, 3, seed=1)
    assert torch.equal(found.labels, again.labels) and found.inertia == again.inertia
    # No worse than the true partition's own centres (Lloyd's fixed point with k-means++ seeding).
    x64 = x.double()
    true_inertia = sum(float(((x64[y == c] - x64[y == c].mean(0)) ** 2).sum()) for c in range(3))
    assert found.inertia == pytest.approx(true_inertia, rel=1e-9)
    with pytest.raises(ValueError, match="k must be in"):
        kmeans(x, 0)


def test_layer_choice_picks_the_planted_layer():
    x, y = _planted(spread=6.0)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))  # no class structure
    scores = [cluster_layer(0, noise, y, 3), cluster_layer(1, x, y, 3), cluster_layer(2, noise * 3 + 1, y, 3)]
    assert scores[1].ari == 1.0 and scores[0].ari < 0.2 and scores[2].ari < 0.2
    assert choose_layer(scores).layer == 1
    # Ties on ARI go to NMI, then to the lower layer.
    tied = [LayerClustering(3, 0.5, 0.6), LayerClustering(1, 0.5, 0.7), LayerClustering(0, 0.5, 0.7)]
    assert choose_layer(tied).layer == 0
