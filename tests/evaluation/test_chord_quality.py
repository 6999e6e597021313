"""`musicrfm eval sweep --preset chord-quality`: every root x every quality, the root steered with the notes bank,
and the per-root judgement of the third (evaluation.chord_quality) on synthetic triads."""

import csv

import numpy as np
import pytest

from musicrfm.evaluation.chord_quality import chord_quality_rows
from musicrfm.evaluation.measure import chord_measures
from musicrfm.evaluation.presets import REFERENCE, SweepSettings, build_configurations, plan_units
from musicrfm.evaluation.run import run_sweep
from musicrfm.probes.syntheory import PITCH_NAMES

QUALITIES = ["aug", "dim", "major", "minor"]
CLASSES = {"notes": list(PITCH_NAMES), "chords": QUALITIES}
SR = 16000


def test_the_preset_crosses_every_root_with_every_quality():
    configs = build_configurations("chord-quality", ["chords"], CLASSES, 4, 4.0)
    assert [c.name for c in configs] == [
        "root only p=1", "root + chords eta0=0.5 p=1", "root + chords eta0=1 p=1", "triad from notes p=1",
        "root only p=0.3", "root + chords eta0=0.5 p=0.3", "root + chords eta0=1 p=0.3", "triad from notes p=0.3"]
    settings = SweepSettings(preset="chord-quality", banks=("b",), out="o", samples=48, seconds=4.0)
    units = plan_units(settings, configs, CLASSES)
    for name in [REFERENCE] + [c.name for c in configs]:
        pairs = [(u.targets[0]["class"], u.targets[-1]["class"]) for u in units if u.config == name]
        assert sorted(pairs) == sorted((r, q) for r in PITCH_NAMES for q in QUALITIES), name
    by_sample = {}
    for u in units:  # every configuration (and the reference) targets the same root and quality at sample i
        by_sample.setdefault(u.sample, set()).add((u.targets[0]["class"], u.targets[-1]["class"]))
    assert all(len(v) == 1 for v in by_sample.values())
    steered = next(u for u in units if u.config == "root + chords eta0=1 p=0.3")
    assert [(c.key.split(":")[0], c.coefficient) for c in steered.spec.controls] == [("notes", 0.5), ("chords", 1.0)]
    assert steered.spec.gate_p == 0.3
    alone = next(u for u in units if u.config == "root only p=1")
    assert [c.coefficient for c in alone.spec.controls] == [0.5, 0.0] and alone.spec.gate_p == 1.0
    # the positive control: the quality's three notes on the sample's root (sample 5: root 5 // 4 = C#, quality
    # 5 % 4 = dim -> C# E G)
    triad = next(u for u in units if u.config == "triad from notes p=1" and u.sample == 5)
    assert [c.key for c in triad.spec.controls] == ["notes:C#", "notes:E", "notes:G", "chords:dim"]
    assert [c.coefficient for c in triad.spec.controls] == [0.5, 0.5, 0.5, 0.0]
    # with a notes bank of the 12 pitch classes the sweep also offers the quality controls (evaluation.run.bank_index):
    # one row per level and gate, its quality cycling with the chords control that names the quality judged
    with_quality = build_configurations("chord-quality", ["chords"], {**CLASSES, "quality": QUALITIES}, 4, 4.0,
                                        eta0=[0.5])
    assert [c.name for c in with_quality][:4] == [
        "root only p=1", "root + chords eta0=0.5 p=1", "root + quality (read root) eta0=0.5 p=1", "triad from notes p=1"]
    units = plan_units(settings, with_quality, {**CLASSES, "quality": QUALITIES})
    read = next(u for u in units if u.config == "root + quality (read root) eta0=0.5 p=1" and u.sample == 6)
    assert [(c.key, c.coefficient) for c in read.spec.controls] == [("notes:C#", 0.5), ("quality:major", 0.5),
                                                                    ("chords:major", 0.0)]
    with pytest.raises(ValueError, match="steers the root with a notes bank"):
        build_configurations("chord-quality", ["chords"], {"chords": QUALITIES}, 4, 4.0)
    with pytest.raises(ValueError, match="steers --concept chords"):
        build_configurations("chord-quality", ["notes"], CLASSES, 4, 4.0)


def _triad(root: int, third: int, seconds: float = 1.0) -> np.ndarray:
    """Root, third and fifth as harmonic tones (6 partials, 1/h) around middle C."""
    t = np.arange(int(SR * seconds)) / SR
    out = np.zeros_like(t)
    for interval in (0, third, 7):
        f0 = 261.63 * 2 ** ((root + interval) / 12)
        out += sum(np.sin(2 * np.pi * f0 * h * t) / h for h in range(1, 7) if f0 * h < SR / 2)
    return out / np.abs(out).max()


def test_third_contrast_reads_major_and_minor_at_every_root():
    records = {}
    for root in range(12):
        for quality, third in (("major", 4), ("minor", 3)):
            m = chord_measures(_triad(root, third), SR, root)
            assert m["template"] == quality and m["template_root"] == root
            assert (m["third_contrast"] > 0) == (quality == "major"), (root, quality, m["third_contrast"])
            records[f"{root}{quality}"] = {"config": "root + chords eta0=1 p=1", "chord": m, "targets": [
                {"concept": "notes", "class": PITCH_NAMES[root]}, {"concept": "chords", "class": quality}]}
    configs = build_configurations("chord-quality", ["chords"], CLASSES, 4, 4.0, eta0=[1.0])
    quality_rows, root_rows = chord_quality_rows(configs, records)
    assert [r["root"] for r in root_rows] == list(PITCH_NAMES) and all(r["difference"] > 0 for r in root_rows)
    assert all(r["template_shift"] == 2.0 for r in root_rows)  # read major when steered so, minor likewise
    # a root where both read minor: the template did not move there (0), the third may still have
    records["1major"]["chord"] = dict(records["1major"]["chord"], template="minor")
    shifts = {r["root"]: r["template_shift"] for r in chord_quality_rows(configs, records)[1]}
    assert shifts["C#"] == 0.0 and shifts["D"] == 2.0
    major = next(r for r in quality_rows if r["quality"] == "major")
    assert major["template_acc"] == 1.0 and major["root_hit"] == 1.0 and major["distinct_roots"] == 12
    assert major["top_root_share"] == pytest.approx(1 / 12)


def test_chord_quality_sweep_end_to_end(tiny, tmp_path):
    """tiny-random with random banks (noise: nothing is judged, only the wiring): every clip carries its chord
    measures, and the preset writes its files."""
    import torch

    from musicrfm.engine.bank import DirectionBank, LayerNorms

    fp, g = tiny.fingerprint, torch.Generator().manual_seed(0)
    paths = []
    for concept, classes in (("notes", list(PITCH_NAMES)), ("chords", ["major", "minor"])):
        bank = DirectionBank.from_arrays(concept, classes, torch.randn(len(classes), fp.num_layers, fp.hidden_size,
                                                                       generator=g),
                                         torch.rand(len(classes), fp.num_layers, generator=g), fp, method="test",
                                         pooling="mean", layer_norms=LayerNorms((1.0,) * fp.num_layers,
                                                                                (0.1,) * fp.num_layers, 1, "test"))
        bank.save(tmp_path / f"{concept}.safetensors")
        paths.append(str(tmp_path / f"{concept}.safetensors"))
    from musicrfm.evaluation.run import bank_index

    classes, where, _ = bank_index(paths)  # the quality controls ride on the notes bank, in the chords' order
    assert classes["quality"] == ["major", "minor"] and where[("quality", "residual")] == paths[0]
    settings = SweepSettings(preset="chord-quality", banks=tuple(paths), out=str(tmp_path / "sweep"), samples=2,
                             concepts=("chords",),
                             seconds=0.3, eta0=(1.0,), model="tiny-random")
    result = run_sweep(settings, progress=False, model=tiny)
    assert result.generated == 2 * 9
    with open(result.files["chord_quality"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["config"] for r in rows} == {REFERENCE, "root only p=1", "root + chords eta0=1 p=1", "root only p=0.3",
                                           "root + chords eta0=1 p=0.3", "triad from notes p=1",
                                           "triad from notes p=0.3", "root + quality (read root) eta0=1 p=1",
                                           "root + quality (read root) eta0=1 p=0.3"}
    assert result.files["chord_quality_summary"].read_text().startswith("# chord quality across roots")
