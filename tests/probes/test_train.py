"""Training per-layer probes into a bank the engine loads; sharding by layer; the stratified split."""

import numpy as np
import pytest
import torch

from musicrfm.engine.audio import read_wav, write_wav
from musicrfm.engine.bank import DirectionBank
from musicrfm.probes.extract import ExtractionSettings, FeatureError, extract_concept
from musicrfm.probes.baselines import fit_linear_regression
from musicrfm.probes.classification import classification_report
from musicrfm.probes.train import TrainSettings, split_indices, train_concept


@pytest.fixture(scope="module")
def feature_dir(tiny, tmp_path_factory):
    """tiny-random features of two pitched tones at several loudnesses (random weights: the features
    still differ by input, which is all these tests need)."""
    root = tmp_path_factory.mktemp("train")
    clips, labels = [], []
    rng = np.random.default_rng(0)
    for i in range(16):
        label, freq = ("low", 110.0) if i % 2 == 0 else ("high", 880.0)
        t = np.arange(16000) / 32000
        audio = (0.2 + 0.6 * rng.random()) * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(t.size)
        path = root / "audio" / f"{label}{i}.wav"
        path.parent.mkdir(exist_ok=True)
        write_wav(path, audio, 32000)
        clips.append(path)
        labels.append(label)
    extract_concept(tiny, "pitch", clips, labels, root / "features", settings=ExtractionSettings(batch_size=8),
                    classes=["low", "high"], load_audio=lambda p, r: read_wav(p)[0], progress=False)
    return root / "features" / "pitch"


def test_split_is_stratified_disjoint_and_seeded():
    labels = ["a"] * 20 + ["b"] * 7 + ["c"] * 3
    tr, va, te = split_indices(labels, seed=1)
    assert sorted(tr + va + te) == list(range(30)) and not set(tr) & set(va) | set(va) & set(te)
    for part in (tr, va, te):
        assert {labels[i] for i in part} == {"a", "b", "c"}
    assert (tr, va, te) == split_indices(labels, seed=1) and (tr, va, te) != split_indices(labels, seed=2)


@pytest.mark.parametrize("method", ["rfm", "linear", "diffmeans"])
def test_train_writes_a_bank_the_engine_loads(tiny, feature_dir, tmp_path, method):
    result = train_concept(feature_dir, tmp_path, TrainSettings(method=method, trials=3), progress=False)
    bank = DirectionBank.load(result.bank_path)
    bank.check_compatible(tiny.fingerprint)
    assert bank.keys() == ["pitch:low", "pitch:high"] and bank.method == method
    assert bank["pitch:low"].vectors.shape == (tiny.num_layers, tiny.hidden_size)
    assert torch.allclose(bank["pitch:low"].vectors.norm(dim=1), torch.ones(tiny.num_layers), atol=1e-4)
    # the activations' typical size, from the features it was trained on (relative strength reads it)
    assert bank.layer_norms is not None and bank.layer_norms.num_layers == tiny.num_layers
    assert min(bank.layer_norms.mean) > 0 and bank.layer_norms.tokens >= 16 * 20
    # Two pure tones an octave and a half apart are separable from the features at some layer.
    assert float(result.scores.max()) > 0.9
    assert result.csv_path.read_text().count("\n") == 1 + 2 * tiny.num_layers
    assert result.plot_path is not None and result.plot_path.stat().st_size > 1000


def test_layers_trained_in_shards_assemble_into_one_bank(tiny, feature_dir, tmp_path):
    first = train_concept(feature_dir, tmp_path, TrainSettings(method="linear", layers=[0, 1]), progress=False)
    assert first.bank_path is None and first.missing_layers == [2, 3]
    second = train_concept(feature_dir, tmp_path, TrainSettings(method="linear", layers=[2, 3]), progress=False)
    whole = train_concept(feature_dir, tmp_path / "one_go", TrainSettings(method="linear"), progress=False)
    a, b = DirectionBank.load(second.bank_path), DirectionBank.load(whole.bank_path)
    for key in a.keys():
        torch.testing.assert_close(a[key].vectors, b[key].vectors)
    with pytest.raises(FeatureError, match="other settings"):
        train_concept(feature_dir, tmp_path, TrainSettings(method="linear", seed=5, layers=[0]), progress=False)


def test_classification_report_writes_csv_and_plot(feature_dir, tmp_path):
    rows = classification_report(feature_dir.parent, ["pitch"], tmp_path, trials=2, progress=False)
    assert [r.probe for r in rows] == ["RFM, mean-pooled", "RFM, last position", "linear probe, mean-pooled"]
    assert all(r.metric == "accuracy" and 0 <= r.test <= 1 and r.best_layer in range(4) for r in rows)
    assert max(r.val for r in rows) >= 0.9  # the two tones are told apart at the best layer
    lines = (tmp_path / "classification.csv").read_text().splitlines()
    assert lines[0] == "concept,probe,metric,best_layer,validation,test" and len(lines) == 4
    assert (tmp_path / "classification.png").stat().st_size > 1000


def test_linear_regression_recovers_a_planted_target():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, 16, generator=g)
    u = torch.zeros(16)
    u[3] = 1.0
    y = 120 + 30 * (X @ u) + 0.5 * torch.randn(300, generator=g)
    reg = fit_linear_regression(X[:200], y[:200], X[200:], y[200:])
    assert reg.val_r2 > 0.99 and float(reg.direction @ u) > 0.99
    assert abs(float(reg.predict(X[:1])[0]) - float(y[0])) < 3
