"""`musicrfm train --invariant-to COLUMN --data DIR`: directions that separate the classes without encoding a
nuisance label (chord quality without the root), on synthetic features where the root is planted."""

import csv
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from musicrfm.main import main
from musicrfm.engine.bank import DirectionBank
from musicrfm.probes.rfm import roc_auc
from musicrfm.probes.train import TrainSettings, balance_cells, train_concept

ROOTS = ["C", "D", "E", "F", "G", "A"]
HIDDEN, LAYERS = 24, 2


def _write_features(root, skew: bool):
    """features/chords (2 layers x 24) and data/chords/info.csv: quality along one fixed axis (+-0.6), the root a
    large offset (2.0 x a random vector per root), noise 0.05. `skew`: major clips are mostly root C (24 of 56),
    so a plain major-vs-minor direction picks up the root."""
    rng = np.random.default_rng(1)
    quality_axis = rng.standard_normal(HIDDEN)
    quality_axis /= np.linalg.norm(quality_axis)
    root_vectors = 2.0 * rng.standard_normal((len(ROOTS), HIDDEN))
    rows, feats = [], []
    for quality, sign in (("major", 1.0), ("minor", -1.0)):
        for r, name in enumerate(ROOTS):
            count = (24 if r == 0 else 4) if (skew and quality == "major") else 6
            for k in range(count):
                stem = f"{name}_{quality}_{k}"
                rows.append({"row_id": len(rows), "root_note_name": name, "chord_type": quality,
                             "synth_file_path": f"{stem}.wav"})
                x = root_vectors[r] + sign * 0.6 * quality_axis
                feats.append(np.stack([x, 1.5 * x]) + 0.05 * rng.standard_normal((LAYERS, HIDDEN)))
    data = root / "data" / "chords"
    data.mkdir(parents=True)
    with (data / "info.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    folder = root / "features" / "chords"
    folder.mkdir(parents=True)
    meta = {"format": "musicrfm.features", "version": 1, "concept": "chords",
            "fingerprint": {"architecture": "musicgen", "num_layers": LAYERS, "hidden_size": HIDDEN},
            "model": "synthetic", "prompt": "", "layers": list(range(LAYERS)), "injection_point": "residual",
            "poolings": ["mean", "last"]}
    index = {"clips": [f"data/chords/{r['synth_file_path']}" for r in rows],
             "labels": [r["chord_type"] for r in rows], "classes": ["major", "minor"], "targets": None, **meta}
    (folder / "index.json").write_text(json.dumps(index))
    X = torch.tensor(np.stack(feats), dtype=torch.float16)
    save_file({"mean": X, "last": X.clone(), "rows": torch.arange(len(rows))}, str(folder / "part-00000.safetensors"),
              metadata={"musicrfm": json.dumps(meta)})
    roots = [r["root_note_name"] for r in rows]
    labels = [r["chord_type"] for r in rows]
    planted = torch.linalg.qr(torch.tensor(root_vectors - root_vectors.mean(0)).T)[0][:, :len(ROOTS) - 1]
    return folder, X.float(), planted, labels, quality_axis


@pytest.fixture(scope="module")
def skewed(tmp_path_factory):
    return _write_features(tmp_path_factory.mktemp("invariance"), skew=True)


def _root_share(direction: torch.Tensor, planted: torch.Tensor) -> float:
    """The norm of a unit direction's part inside the planted root subspace (0: root-invariant). Training
    estimates that subspace from noisy means (noise 0.05 against root offsets of ~10), hence tolerances of 0.05."""
    return float((planted.T @ direction.double()).norm())


@pytest.mark.parametrize("method", ["diffmeans", "linear", "rfm"])
def test_invariant_directions_are_orthogonal_to_the_root_span_and_still_separate_quality(skewed, tmp_path, method):
    folder, X, planted, labels, quality_axis = skewed
    settings = TrainSettings(method=method, trials=2, invariant_to="root_note_name",
                             data=str(folder.parent.parent / "data"))
    bank = DirectionBank.load(train_concept(folder, tmp_path, settings, progress=False).bank_path)
    major = torch.tensor([label == "major" for label in labels])
    for layer in range(LAYERS):
        v = bank["chords:major"].vectors[layer]
        assert _root_share(v, planted) < 0.05
        auc = float(roc_auc((X[:, layer].double() @ v.double())[:, None], major[:, None])[0])
        assert auc > 0.95, (method, layer, auc)
    # The planted quality axis is what is left: |cos| well above a random direction's (~0.2 in 24 dimensions).
    assert abs(float(bank["chords:major"].vectors[0].double() @ torch.tensor(quality_axis))) > 0.5


def test_without_invariance_the_skewed_classes_leak_the_root(skewed, tmp_path):
    """The control: on the same features a plain difference of means points partly along the root (major is
    mostly C), so the invariant run above is what removed it."""
    folder, X, planted, _, _ = skewed
    bank = DirectionBank.load(train_concept(folder, tmp_path, TrainSettings(method="diffmeans"),
                                            progress=False).bank_path)
    assert _root_share(bank["chords:major"].vectors[0], planted) > 0.5


def test_invariance_metadata_round_trips_and_cells_are_balanced(skewed, tmp_path):
    folder, *_ = skewed
    settings = TrainSettings(method="diffmeans", invariant_to="root_note_name", data=str(folder.parent.parent / "data"))
    result = train_concept(folder, tmp_path, settings, progress=False)
    assert result.bank_path.name == "chords.diffmeans.invariant-root_note_name.safetensors"
    meta = DirectionBank.load(result.bank_path).metadata["invariance"]
    assert meta["column"] == "root_note_name" and meta["values"] == 6
    assert meta["removed_dims"] == [5, 5]  # 6 root means about their grand mean span 5 dimensions
    # every (quality, root) cell cut to the smallest one: 12 cells x the same count
    assert meta["balanced"]["train"] == 12 * meta["balanced"]["per_cell_train"]
    assert meta["balanced"]["validation"] % 12 == 0


def test_balance_cells_cuts_to_the_smallest_cell_and_refuses_an_empty_one():
    labels = ["major"] * 5 + ["minor"] * 3
    roots = ["C", "C", "C", "D", "D", "C", "D", "D"]
    kept = balance_cells(range(8), labels, roots)
    assert kept == [0, 3, 5, 6]  # C-minor holds one clip: each of the four cells keeps its first one
    with pytest.raises(ValueError, match="class 'minor' has no clip with value 'E'"):
        balance_cells(range(9), labels + ["major"], roots + ["E"])


def test_cli_flag_errors(skewed, tmp_path, capsys):
    folder, *_ = skewed
    base = ["train", "--features", str(folder.parent), "--concepts", "chords", "--out", str(tmp_path), "--quiet"]
    assert main(base + ["--invariant-to", "root_note_name"]) == 2
    assert "--invariant-to root_note_name needs --data" in capsys.readouterr().err
    assert main(base + ["--invariant-to", "root_pitch", "--data", str(folder.parent.parent / "data")]) == 2
    assert "has no column 'root_pitch'" in capsys.readouterr().err
    assert main(base + ["--data", str(folder.parent.parent / "data")]) == 2
    assert "--data is only read with --invariant-to" in capsys.readouterr().err
