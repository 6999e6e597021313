"""Distribution metrics (evaluation/metrics.py) against known values, and the embedders
(evaluation/embedding.py): the log-mel fallback, and CLAP on a tiny random-weight model built here.

The CLAP model of these tests has random weights: its numbers mean nothing. The tests check the
plumbing (shapes, normalisation, determinism, loading by path, the error for a missing model),
not CLAP's quality; no real CLAP weights are available on this machine.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from musicrfm.evaluation.embedding import (
    CLAP_UNAVAILABLE,
    AudioEmbedder,
    ClapEmbedder,
    ClapWeightsNotFoundError,
    LogMelStatsEmbedder,
    as_clips,
    clap_score,
)
from musicrfm.evaluation.metrics import RBFKernel, frechet_distance, frechet_distance_gaussians, gaussian_stats, mmd2_unbiased


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(w)) @ v.T


def _rotation(theta: float) -> np.ndarray:
    return np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])


# Two elongated 2-D Gaussians at 60 degrees to each other: their covariances do not commute, so
# the common mistake Tr(S1^1/2 S2^1/2) (right only for commuting S1, S2) is far off (see below).
MU1, MU2 = np.zeros(2), np.array([0.3, -0.2])
S1 = np.diag([4.0, 0.25])
S2 = _rotation(np.pi / 3) @ np.diag([4.0, 0.25]) @ _rotation(np.pi / 3).T


# ------------------------------------------------------------------------------------------
# Fréchet distance


def test_fd_closed_forms():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance_gaussians([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9.0 + 1.0, abs=1e-12)
    # commuting (diagonal) covariances: ||mu1 - mu2||^2 + ||S1^1/2 - S2^1/2||_F^2
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    mu = np.array([1.0, 2.0, -2.0])
    expected = mu @ mu + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance_gaussians(mu, np.diag(a), np.zeros(3), np.diag(b)) == pytest.approx(expected, abs=1e-12)
    # non-commuting 2x2: Tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) for M = S1 S2 (non-negative eigenvalues)
    m = S1 @ S2
    trace_sqrt = np.sqrt(np.trace(m) + 2.0 * np.sqrt(np.linalg.det(m)))
    expected = (MU1 - MU2) @ (MU1 - MU2) + np.trace(S1) + np.trace(S2) - 2.0 * trace_sqrt
    assert frechet_distance_gaussians(MU1, S1, MU2, S2) == pytest.approx(expected, abs=1e-12)
    # identical Gaussians: exactly 0 (clipped, never negative)
    assert frechet_distance_gaussians(MU2, S2, MU2, S2) == pytest.approx(0.0, abs=1e-12)
    # a singular covariance (rank 1) is fine
    line = np.outer([1.0, 2.0], [1.0, 2.0])
    assert frechet_distance_gaussians(MU1, line, MU1, line) == pytest.approx(0.0, abs=1e-12)


def test_fd_of_a_set_with_itself_is_zero_and_fd_is_symmetric():
    rng = np.random.default_rng(0)
    mixing = rng.standard_normal((16, 16))
    x = rng.standard_normal((400, 16)) @ mixing + 3.0
    y = rng.standard_normal((300, 16)) @ mixing.T
    scale = np.trace(np.cov(x, rowvar=False))
    assert frechet_distance(x, x) <= 1e-6 * scale
    assert frechet_distance(x, y) == pytest.approx(frechet_distance(y, x), rel=1e-9)
    # fewer samples than dimensions: singular covariances, still ~0 against itself
    few = rng.standard_normal((10, 32))
    assert frechet_distance(few, few) <= 1e-6 * np.trace(np.cov(few, rowvar=False))


def test_fd_of_samples_matches_the_closed_form():
    rng = np.random.default_rng(1)
    n = 20_000
    x = rng.multivariate_normal(MU1, S1, n)
    y = rng.multivariate_normal(MU2, S2, n)
    truth = frechet_distance_gaussians(MU1, S1, MU2, S2)  # 3.147
    # The estimate's standard deviation at n = 20,000 is 0.032 (200 simulated repeats); its bias
    # is O(d/n). Tolerance 0.15 (~5 SD), while the commuting-only formula is 0.36 away: a
    # wrong square root fails this test.
    tolerance = 0.15
    assert frechet_distance(x, y) == pytest.approx(truth, abs=tolerance)
    wrong = (MU1 - MU2) @ (MU1 - MU2) + np.trace(S1) + np.trace(S2) - 2 * np.trace(_psd_sqrt(S1) @ _psd_sqrt(S2))
    assert abs(wrong - truth) > 2 * tolerance


def test_gaussian_stats_are_mean_and_unbiased_covariance():
    x = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 8.0]])
    mu, cov = gaussian_stats(x)
    np.testing.assert_allclose(mu, [2.0, 4.0])
    np.testing.assert_allclose(cov, np.cov(x.T, ddof=1))
    assert gaussian_stats(np.arange(4.0)[:, None])[1].shape == (1, 1)


def test_fd_errors():
    good = np.zeros((5, 3)) + np.arange(5.0)[:, None]
    with pytest.raises(ValueError, match="1 sample"):
        frechet_distance(good[:1], good)
    with pytest.raises(ValueError, match="dimension mismatch: x has 3 dims, y has 2"):
        frechet_distance(good, good[:, :2])
    bad = good.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"y contains NaN or infinite values \(1 of 5 rows\)"):
        frechet_distance(good, bad)
    with pytest.raises(ValueError, match="2-D"):
        frechet_distance(good[:, 0], good)
    with pytest.raises(ValueError, match="covariances must be"):
        frechet_distance_gaussians(np.zeros(2), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="sigma2 contains NaN"):
        frechet_distance_gaussians(np.zeros(2), np.eye(2), np.zeros(2), np.full((2, 2), np.nan))


# ------------------------------------------------------------------------------------------
# MMD


def test_mmd_known_value():
    # x = {0, 1}, y = {0, 2}, bandwidth 1: k = exp(-d^2 / 2)
    x, y = np.array([[0.0], [1.0]]), np.array([[0.0], [2.0]])
    xx = np.exp(-0.5)  # the one off-diagonal pair, (1/(2*1)) * 2 * k(0, 1)
    yy = np.exp(-2.0)
    xy = (1.0 + np.exp(-2.0) + np.exp(-0.5) + np.exp(-0.5)) / 4
    assert mmd2_unbiased(x, y, RBFKernel(1.0)) == pytest.approx(xx + yy - 2 * xy, abs=1e-15)


def test_median_heuristic_and_the_kernel_is_frozen():
    ref = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])  # pairwise distances 3, 4, 5
    kernel = RBFKernel.from_reference(ref)
    assert kernel.bandwidth == pytest.approx(4.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        kernel.bandwidth = 1.0  # type: ignore[misc]
    # comparisons against other sets reuse the reference's bandwidth; nothing is re-estimated
    rng = np.random.default_rng(2)
    for shift in (0.0, 10.0):
        y = rng.standard_normal((30, 2)) * 5 + shift
        assert mmd2_unbiased(ref, y, kernel) == mmd2_unbiased(ref, y, RBFKernel(4.0))
        assert kernel.bandwidth == 4.0
    # large references: a seeded subset, deterministic
    big = rng.standard_normal((3000, 4))
    a = RBFKernel.from_reference(big, max_samples=500)
    assert a == RBFKernel.from_reference(big, max_samples=500)
    assert a.bandwidth == pytest.approx(RBFKernel.from_reference(big, max_samples=None).bandwidth, rel=0.05)


def test_mmd_unbiasedness_and_power():
    rng = np.random.default_rng(3)
    kernel = RBFKernel.from_reference(rng.standard_normal((200, 2)))
    draws, n = 400, 20
    same, shifted, biased = [], [], []
    for _ in range(draws):
        x, y = rng.standard_normal((n, 2)), rng.standard_normal((n, 2))
        same.append(mmd2_unbiased(x, y, kernel))
        # the V-statistic keeps the diagonal k(x_i, x_i) = 1 terms: biased upward by ~2/n
        biased.append(kernel(x, x).mean() + kernel(y, y).mean() - 2 * kernel(x, y).mean())
        shifted.append(mmd2_unbiased(x, y + np.array([1.5, 0.0]), kernel))
    same, shifted, biased = map(np.asarray, (same, shifted, biased))

    def standard_error(values):
        return values.std(ddof=1) / np.sqrt(len(values))

    assert abs(same.mean()) < 3 * standard_error(same), (same.mean(), standard_error(same))
    assert (same < 0).mean() > 0.2  # individual values can be (and often are) negative
    assert biased.mean() > 10 * standard_error(biased)  # the test would catch the biased form
    assert shifted.mean() > 10 * standard_error(shifted) and (shifted > 0).mean() > 0.99


def test_mmd_in_blocks_equals_the_direct_sum():
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((1500, 3)), rng.standard_normal((1100, 3)) + 0.2
    kernel = RBFKernel(1.3)
    kxx, kyy = kernel(x, x), kernel(y, y)
    direct = ((kxx.sum() - np.trace(kxx)) / (1500 * 1499) + (kyy.sum() - np.trace(kyy)) / (1100 * 1099)
              - 2 * kernel(x, y).mean())  # fmt: skip
    assert mmd2_unbiased(x, y, kernel) == pytest.approx(direct, rel=1e-10)


def test_mmd_errors():
    x = np.random.default_rng(5).standard_normal((5, 2))
    with pytest.raises(TypeError, match="RBFKernel"):
        mmd2_unbiased(x, x, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bandwidth must be a positive"):
        RBFKernel(0.0)
    with pytest.raises(ValueError, match="1 sample"):
        mmd2_unbiased(x[:1], x, RBFKernel(1.0))
    with pytest.raises(ValueError, match="dimension mismatch"):
        mmd2_unbiased(x, x[:, :1], RBFKernel(1.0))
    with pytest.raises(ValueError, match="NaN"):
        RBFKernel.from_reference(np.full((4, 2), np.nan))
    with pytest.raises(ValueError, match="median distance"):
        RBFKernel.from_reference(np.zeros((4, 2)))


# ------------------------------------------------------------------------------------------
# Embeddings: the log-mel fallback


def _tone(freq: float, sr: int, seconds: float = 2.0, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return (amplitude * sum(np.sin(2 * np.pi * freq * h * t) / h for h in range(1, 6))).astype(np.float32)


def test_logmel_stats_embedder():
    embedder = LogMelStatsEmbedder()
    assert isinstance(embedder, AudioEmbedder) and embedder.name == "logmel-stats-v1"
    clips = [_tone(261.63, 32_000), _tone(440.0, 32_000, seconds=1.5), np.zeros(16_000, np.float32)]
    z = embedder.embed(clips, 32_000)
    assert z.shape == (3, embedder.dim) == (3, 140) and z.dtype == np.float64 and np.all(np.isfinite(z))
    np.testing.assert_array_equal(z, embedder.embed(clips, 32_000))  # deterministic
    np.testing.assert_array_equal(z[:1], embedder.embed(clips[0], 32_000))  # one clip -> [1, d]
    # fixed analysis rate: the same tone at 48 kHz embeds to nearly the same vector
    at_48k = embedder.embed(_tone(261.63, 48_000), 48_000)[0]
    assert np.linalg.norm(at_48k - z[0]) < 0.02 * np.linalg.norm(z[0])
    # layout: 64 band means (dB), 64 band spreads, 12 pitch classes x 10
    chroma = z[:, 128:]
    assert chroma[0].argmax() == 0 and chroma[1].argmax() == 9  # C4 -> C, A4 -> A
    assert chroma[0].sum() == pytest.approx(10.0) and not chroma[2].any()  # silence: floor dB, no chroma
    assert np.all(z[2, :64] == -100.0)
    # louder by 6 dB moves every band mean by ~6 (level is kept)
    louder = embedder.embed(2.0 * clips[0], 32_000)[0]
    loud_bands = z[0, :64] > -60
    np.testing.assert_allclose(louder[:64][loud_bands] - z[0, :64][loud_bands], 20 * np.log10(2.0), atol=0.05)


def test_logmel_timbre_embedder_is_the_stats_without_the_pitch_classes():
    """logmel-timbre-v1 leaves out what a notes sweep steers: two tones a fifth apart differ there only by the
    spectral envelope, not by a 12-dimensional profile that points at their two pitch classes."""
    stats, timbre = LogMelStatsEmbedder(), LogMelStatsEmbedder.named("logmel-timbre-v1")
    assert timbre.name == "logmel-timbre-v1" and timbre.dim == 128 and LogMelStatsEmbedder.named("logmel-stats-v1").dim == 140
    clips = [_tone(261.63, 32_000), _tone(392.0, 32_000)]
    full, less = stats.embed(clips, 32_000), timbre.embed(clips, 32_000)
    np.testing.assert_array_equal(less, full[:, :128])
    assert np.linalg.norm(less[0] - less[1]) < np.linalg.norm(full[0] - full[1])
    with pytest.raises(ValueError, match="unknown embedder 'chroma'"):
        LogMelStatsEmbedder.named("chroma")


def test_clip_input_validation():
    assert len(as_clips(np.zeros((3, 100)))) == 3
    with pytest.raises(ValueError, match="NaN"):
        as_clips([np.array([0.0, np.nan])])
    with pytest.raises(ValueError, match="1-D .* or 2-D"):
        as_clips(np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="empty"):
        as_clips([np.zeros(0)])
    with pytest.raises(ValueError, match="sample_rate"):
        LogMelStatsEmbedder().embed(np.zeros(100), 0)


# ------------------------------------------------------------------------------------------
# CLAP on a tiny random-weight model (meaningless numbers; the plumbing is what is checked)


def _save_tiny_clap(folder: Path, fused: bool = False) -> Path:
    """A ClapModel from a small random config plus its processor, saved with save_pretrained."""
    import torch
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor, RobertaTokenizer

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4}
    for char in "abcdefghijklmnopqrstuvwxyz\u0120":  # \u0120: byte-level BPE's space
        vocab[char] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = RobertaTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    # the fused variant's feature extractor is hard-wired to 64 mel bins
    mels, spec = (64, 256) if fused else (16, 64)
    config = ClapConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "intermediate_size": 32, "max_position_embeddings": 64, "projection_dim": 8},
        audio_config={"depths": [1, 1], "num_attention_heads": [1, 1], "patch_embeds_hidden_size": 8,
                      "hidden_size": 16, "spec_size": spec, "num_mel_bins": mels, "window_size": 8,
                      "projection_dim": 8, "enable_fusion": fused, "fusion_type": "aff_2d" if fused else None},
        projection_dim=8,
    )  # fmt: skip
    torch.manual_seed(0)
    ClapModel(config).save_pretrained(folder)
    # the released unfused models crop long clips at random ("rand_trunc"), fused ones fuse 3 random
    # crops ("fusion"); 2 s windows here
    truncation = "fusion" if fused else "rand_trunc"
    extractor = ClapFeatureExtractor(feature_size=mels, max_length_s=2, truncation=truncation)
    ClapProcessor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_clap(tmp_path_factory) -> Path:
    return _save_tiny_clap(tmp_path_factory.mktemp("tiny-clap"))


def _noise(seed: int, seconds: float, sr: int = 32_000) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * sr))).astype(np.float32)


def test_clap_embedder_on_a_tiny_random_model(tiny_clap):
    embedder = ClapEmbedder(tiny_clap, batch_size=2)
    assert isinstance(embedder, AudioEmbedder)
    assert embedder.name == f"clap:{tiny_clap}" and embedder.sample_rate == 48_000
    clips = [_noise(0, 1.0), _noise(1, 1.5), _noise(2, 3.0)]  # the last is longer than the 2 s window
    state = np.random.get_state()
    z = embedder.embed(clips, 32_000)
    assert np.random.get_state()[1].tolist() == state[1].tolist()  # the caller's RNG is left alone
    assert z.shape == (3, 8) and z.dtype == np.float64
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-12)
    np.testing.assert_array_equal(z, embedder.embed(clips, 32_000))  # deterministic, random crop included
    # a clip's embedding does not depend on its batch
    np.testing.assert_allclose(embedder.embed(clips[1], 32_000)[0], z[1], atol=1e-6)
    # loading by path as text gives the same model
    np.testing.assert_allclose(ClapEmbedder(str(tiny_clap)).embed(clips, 32_000), z, atol=1e-6)

    texts = ["a cat", "piano chords", "a dog barks"]
    t = embedder.embed_text(texts)
    assert t.shape == (3, 8)
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, atol=1e-12)
    scores = embedder.clap_score(clips, texts, 32_000)
    assert scores.shape == (3,) and np.all(np.abs(scores) <= 1.0)
    np.testing.assert_allclose(scores, np.sum(z * t, axis=1), atol=1e-12)  # raw cosine, not x100
    result = clap_score(clips, texts, 32_000, model=embedder)
    assert result.available and result.reason == "ok" and result.embedder == embedder.name
    np.testing.assert_allclose(result.scores, scores)
    with pytest.raises(ValueError, match="3 clip.*2 text"):
        embedder.clap_score(clips, texts[:2], 32_000)


def test_fused_clap_embeddings_do_not_depend_on_the_batch(tmp_path):
    # "fusion" processors flag a random clip of a batch with no long clip as "longer"; the
    # embedder sets the flag from each clip's own length instead
    embedder = ClapEmbedder(_save_tiny_clap(tmp_path, fused=True), batch_size=3)
    clips = [_noise(0, 1.0), _noise(1, 1.5), _noise(2, 3.0)]
    z = embedder.embed(clips, 32_000)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-12)
    np.testing.assert_array_equal(z, embedder.embed(clips, 32_000))
    for i, clip in enumerate(clips):
        np.testing.assert_allclose(embedder.embed(clip, 32_000)[0], z[i], atol=1e-6)


def test_clap_score_without_weights_is_unavailable_not_estimated():
    result = clap_score([_noise(0, 1.0)], ["a cat"], 32_000)
    assert result.scores is None and result.mean is None and not result.available
    assert result.reason == CLAP_UNAVAILABLE == "unavailable: no CLAP weights supplied"


def test_missing_clap_weights_are_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ClapWeightsNotFoundError) as caught:
        ClapEmbedder("laion/clap-htsat-unfused")
    message = str(caught.value)
    assert "'laion/clap-htsat-unfused'" in message and "nothing is downloaded" in message
    assert "`hf download laion/clap-htsat-unfused`" in message and CLAP_UNAVAILABLE in message
    assert isinstance(caught.value, FileNotFoundError)
    with pytest.raises(ClapWeightsNotFoundError, match="directory not found: .*no-such-dir"):
        ClapEmbedder(tmp_path / "no-such-dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ClapWeightsNotFoundError, match="not a complete CLAP directory"):
        ClapEmbedder(tmp_path / "empty")
    with pytest.raises(ClapWeightsNotFoundError):
        clap_score([_noise(0, 1.0)], ["a cat"], 32_000, model=tmp_path / "no-such-dir")
