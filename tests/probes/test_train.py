"""Training per-layer probes into a bank the engine loads; sharding by layer; the stratified split."""

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from musicrfm.engine.audio import read_wav, write_wav
from musicrfm.engine.bank import DirectionBank
from musicrfm.probes import rfm, train
from musicrfm.probes.extract import ExtractionSettings, FeatureError, extract_concept, load_features
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


def test_per_class_metric_bank_holds_each_classs_own_m_direction(feature_dir, tmp_path):
    """`train --rfm-metric per-class`: its own files, its setting in the bank, validation AUCs named so, and
    each direction the one fit_binary_directions(shared_metric=False) gives on the same split and search."""
    from musicrfm.probes.extract import load_features
    from musicrfm.probes.rfm import SearchConfig, fit_binary_directions

    result = train_concept(feature_dir, tmp_path, TrainSettings(trials=2, rfm_metric="per-class", device="cpu"),
                           progress=False)
    assert result.bank_path.name == "pitch.rfm.per-class.safetensors"
    assert result.csv_path.name == "pitch.rfm.per-class.scores.csv"
    assert list(_csv_rows(result.csv_path)[0])[:3] == ["layer", "class", "val_auc"]
    bank = DirectionBank.load(result.bank_path)
    assert bank.metadata["rfm_metric"] == "per-class" and bank.metadata["scores"].startswith("validation AUC")
    fs = load_features(feature_dir, layers=[2])
    y = torch.tensor([fs.classes.index(label) for label in fs.labels])
    tr, va, _ = split_indices(fs.labels, 0)
    X = fs.features["mean"][:, 0]
    direct = fit_binary_directions(X[tr], y[tr], X[va], y[va], 2, SearchConfig(seed=0, device="cpu", trials=2),
                                   shared_metric=False)
    for c, key in enumerate(["pitch:low", "pitch:high"]):
        torch.testing.assert_close(bank[key].vectors[2], direct[c].direction)
        assert float(bank[key].scores[2]) == pytest.approx(direct[c].val_auc, abs=1e-6)
    with pytest.raises(ValueError, match="RFM option"):
        TrainSettings(method="linear", rfm_metric="per-class")


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
    rows = classification_report(feature_dir.parent, ["pitch"], tmp_path, trials=2, components=2, progress=False)
    assert [r.probe for r in rows] == ["RFM, mean-pooled, shared M", "RFM, mean-pooled, per-class M",
                                       "RFM aggregated over layers", "RFM, last position", "linear probe, mean-pooled"]
    assert all(r.metric == "accuracy" and 0 <= r.test <= 1 and 0 <= r.val_auc <= 1 for r in rows)
    assert [r.best_layer in range(4) for r in rows] == [True, True, False, True, True]
    assert rows[2].best_layer is None  # the aggregated probe reads every layer
    assert max(r.val for r in rows) >= 0.9  # the two tones are told apart at the best layer
    with (tmp_path / "classification.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert list(table[0]) == ["concept", "probe", "metric", "best_layer", "validation", "val_auc", "test"]
    assert [t["probe"] for t in table] == [r.probe for r in rows] and table[2]["best_layer"] == "all"
    assert all(float(t["val_auc"]) == pytest.approx(r.val_auc, abs=1e-4) for t, r in zip(table, rows))
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


# ---------------------------------------------------------------------------------------------------
# A layer without a probe (issue 14): reported, left out of the weighting, the bank still written


def _csv_rows(path):
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_a_layer_where_every_trial_fails_is_reported_and_the_bank_still_written(feature_dir, tmp_path, monkeypatch,
                                                                                 capsys):
    """Every RFM trial fails numerically at layer 1 (the solver forced to fail there): the layer gets the
    difference of class means at chance score, the CSV and the bank say so, and the bank is written."""
    fit_layer, calls = train._fit_layer, []

    def fail(K, reg, Y, jitters=()):
        raise rfm._FitFailure("forced: K + reg I is not positive definite")

    def second_layer_fails(*args):
        calls.append(1)
        with monkeypatch.context() as m:
            if len(calls) == 2:
                m.setattr(rfm, "_solve_krr", fail)
            return fit_layer(*args)

    monkeypatch.setattr(train, "_fit_layer", second_layer_fails)
    result = train_concept(feature_dir, tmp_path, TrainSettings(trials=3), progress=False)
    err = capsys.readouterr().err
    assert "warning: pitch.rfm layer 1: no probe (every trial of the search failed numerically" in err
    assert "forced" in err and "layer 0" not in err
    assert list(result.fallback_layers) == [1] and "no probe at layers [1]" in result.summary()

    rows = _csv_rows(result.csv_path)
    assert list(rows[0]) == ["layer", "class", "val_auc", "status", "note"] and len(rows) == 2 * 4
    for row in rows:
        if row["layer"] == "1":
            assert row["status"] == "fallback" and row["val_auc"] == "0.500000"
            assert "every trial" in row["note"] and "forced" in row["note"]
            assert "difference of class means" in row["note"] and "chance (0.5)" in row["note"]
        else:
            assert row["status"] == "ok" and row["note"] == ""

    bank = DirectionBank.load(result.bank_path)
    (entry,) = bank.metadata["fallback_layers"]
    assert entry["layer"] == 1 and "forced" in entry["reason"] and entry["direction"] == "the difference of class means"
    fs = load_features(feature_dir, layers=[1], poolings=["mean"])
    tr, _, _ = split_indices(fs.labels, 0)
    X = fs.features["mean"][tr, 0].double()
    low = torch.tensor([fs.labels[i] == "low" for i in tr])
    expected = X[low].mean(0) - X[~low].mean(0)
    for name, sign in (("pitch:low", 1), ("pitch:high", -1)):
        d = bank[name]
        assert float(d.scores[1]) == 0.5 and float(d.scores.max()) > 0.5
        cos = float(d.vectors[1].double() @ expected / expected.norm())
        assert cos * sign > 0.9999

    # A resumed run reads the layer's status back from its part: same CSV and bank, no second warning.
    again = train_concept(feature_dir, tmp_path, TrainSettings(trials=3), progress=False)
    assert again.fallback_layers == result.fallback_layers and "warning" not in capsys.readouterr().err
    assert DirectionBank.load(again.bank_path).metadata == bank.metadata


def _with_constant_layers(src, dst, layers):
    """A copy of a feature directory whose mean-pooled features at `layers` are the same for every clip."""
    shutil.copytree(src, dst)
    for part in sorted(dst.glob("part-*.safetensors")):
        with safe_open(str(part), framework="pt") as f:
            tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
        tensors["mean"][:, layers] = 0.25
        save_file(tensors, str(part), metadata=metadata)
    return dst


def test_cli_train_warns_about_a_degenerate_layer_and_exits_0(feature_dir, tmp_path):
    """`musicrfm train` on features constant at layer 2: a warning, exit 0, a bank whose layer 2 borrows
    layer 1's directions (class means coincide there too), scored at chance."""
    features = tmp_path / "features"
    _with_constant_layers(feature_dir, features / "pitch", [2])
    cli = [shutil.which("musicrfm")] if shutil.which("musicrfm") else [sys.executable, "-m", "musicrfm"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    r = subprocess.run([*cli, "train", "--features", str(features), "--concepts", "pitch", "--out",
                        str(tmp_path / "banks"), "--trials", "2", "--quiet"], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert ("warning: pitch.rfm layer 2: no probe (all training feature vectors are identical: there is nothing "
            "to probe)") in r.stderr
    assert "no probe at layers [2]" in r.stdout and "bank" in r.stdout
    bank = DirectionBank.load(tmp_path / "banks" / "pitch.rfm.safetensors")
    assert [e["layer"] for e in bank.metadata["fallback_layers"]] == [2]
    assert "nearest probed layer" in bank.metadata["fallback_layers"][0]["direction"]
    for name in bank.keys():
        assert torch.equal(bank[name].vectors[2], bank[name].vectors[1]) and float(bank[name].scores[2]) == 0.5
    rows = [row for row in _csv_rows(tmp_path / "banks" / "pitch.rfm.scores.csv") if row["layer"] == "2"]
    assert rows and all(row["status"] == "fallback" and "identical" in row["note"] for row in rows)


def test_no_bank_when_no_layer_can_be_probed(feature_dir, tmp_path):
    features = _with_constant_layers(feature_dir, tmp_path / "features" / "pitch", [0, 1, 2, 3])
    with pytest.raises(rfm.ProbeFailure, match="no probe could be fitted at any layer"):
        train_concept(features, tmp_path / "banks", TrainSettings(method="diffmeans"), progress=False)
    assert not (tmp_path / "banks" / "pitch.diffmeans.safetensors").exists()
    rows = _csv_rows(tmp_path / "banks" / "pitch.diffmeans.scores.csv")
    assert len(rows) == 8 and all(row["status"] == "fallback" for row in rows)


def test_train_layer_choice_clustering_writes_csv_and_bank_metadata(feature_dir, tmp_path, test_bank_path):
    """`train --method linear --layer-choice clustering`: ARI and NMI per layer beside the validation AUCs, the
    chosen layer (best ARI) in the bank's metadata and DirectionBank.chosen_layer."""
    result = train_concept(feature_dir, tmp_path, TrainSettings(method="linear", layer_choice="clustering"),
                           progress=False)
    rows = list(csv.DictReader(result.csv_path.open()))
    assert list(rows[0]) == ["layer", "class", "val_auc", "status", "note", "ari", "nmi"]
    ari = {int(r["layer"]): float(r["ari"]) for r in rows}
    bank = DirectionBank.load(result.bank_path)
    choice = bank.metadata["layer_choice"]
    assert choice["method"] == "clustering" and choice["index"] == "ari" and choice["k"] == 2
    assert bank.chosen_layer == choice["layer"] == max(sorted(ari), key=lambda k: (round(ari[k], 6), -k))
    assert "clustering layer choice: layer" in result.summary()
    from musicrfm.engine.bank import BankFormatError

    # The features' site travels into the bank: the same features relabelled as read at the attention output.
    attention = tmp_path / "attention" / "pitch"
    shutil.copytree(feature_dir, attention)
    index = json.loads((attention / "index.json").read_text())
    (attention / "index.json").write_text(json.dumps({**index, "injection_point": "attention"}))
    for part in attention.glob("part-*.safetensors"):
        with safe_open(str(part), framework="pt") as f:
            tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["musicrfm"])
        save_file(tensors, str(part), metadata={"musicrfm": json.dumps({**meta, "injection_point": "attention"})})
    moved = train_concept(attention, tmp_path / "attention-banks", TrainSettings(method="diffmeans"), progress=False)
    assert DirectionBank.load(moved.bank_path).injection_point == "attention" and bank.injection_point == "residual"
    with pytest.raises(BankFormatError, match="no chosen layer"):
        DirectionBank.load(test_bank_path).chosen_layer  # a bank trained without a layer choice
    with pytest.raises(ValueError, match="unknown layer choice"):
        TrainSettings(layer_choice="elbow")
