"""`musicrfm eval sweep`: presets that follow the paper, seeded units, end-to-end runs on tiny-random (its audio
is noise, and every output must say so), resume, probe traces, CLAP plumbing, and Ray == local."""

import csv
import json
import os

import numpy as np
import pytest
import torch

from musicrfm.engine.audio import read_wav, write_wav
from musicrfm.engine.bank import DirectionBank
from musicrfm.main import main as cli_main
from musicrfm.engine.steering import LayerWeighting, Schedule, crossfade
from musicrfm.engine.model import NOISE_LABEL
from musicrfm.evaluation import run
from musicrfm.evaluation.presets import REFERENCE, SweepSettings, build_configurations, plan_units, topk_values
from musicrfm.evaluation.run import run_sweep
from musicrfm.probes.extract import ExtractionSettings, extract_concept

NOTES = ["C", "G", "D"]
TONES = {"C": 261.63, "G": 392.0, "D": 293.66}


@pytest.fixture(scope="module")
def banks(tiny, tmp_path_factory):
    """Random unit directions for tiny-random: notes C, G, D and chords major, minor."""
    fp, g = tiny.fingerprint, torch.Generator().manual_seed(0)
    root = tmp_path_factory.mktemp("sweep-banks")
    out = {}
    for concept, classes in (("notes", NOTES), ("chords", ["major", "minor"])):
        bank = DirectionBank.from_arrays(concept, classes, torch.randn(len(classes), fp.num_layers, fp.hidden_size,
                                                                       generator=g),
                                         torch.rand(len(classes), fp.num_layers, generator=g), fp, method="test",
                                         pooling="mean")
        bank.save(root / f"{concept}.safetensors")
        out[concept] = str(root / f"{concept}.safetensors")
    return out


@pytest.fixture(scope="module")
def features(tiny, tmp_path_factory):
    """tiny-random features of pure tones labelled C / G / D (what `musicrfm extract` writes)."""
    root = tmp_path_factory.mktemp("sweep-features")
    (root / "audio").mkdir()
    rng = np.random.default_rng(0)
    clips, labels = [], []
    for i in range(18):
        label = NOTES[i % 3]
        t = np.arange(16000) / 32000
        audio = (0.2 + 0.6 * rng.random()) * np.sin(2 * np.pi * TONES[label] * t) + 0.01 * rng.standard_normal(t.size)
        path = root / "audio" / f"{label}{i}.wav"
        write_wav(path, audio, 32000)
        clips.append(path)
        labels.append(label)
    extract_concept(tiny, "notes", clips, labels, root / "features", settings=ExtractionSettings(batch_size=6),
                    classes=NOTES, load_audio=lambda p, r: read_wav(p)[0], progress=False)
    return str(root / "features")


@pytest.fixture(scope="module")
def tempo_features(tiny, tmp_path_factory):
    """tiny-random features of click tracks at 60, 120 and 180 BPM with their BPM as targets (a regression)."""
    root = tmp_path_factory.mktemp("sweep-tempo-features")
    (root / "audio").mkdir()
    rng = np.random.default_rng(1)
    clips, labels, targets = [], [], []
    for i in range(18):
        bpm = (60, 120, 180)[i % 3]
        audio = 0.01 * rng.standard_normal(16000)
        for start in np.arange(rng.integers(0, 800), 16000 - 320, round(32000 * 60 / bpm)):
            audio[start:start + 320] += rng.standard_normal(320) * np.exp(-np.arange(320) / 80)
        path = root / "audio" / f"{bpm}_{i}.wav"
        write_wav(path, audio, 32000)
        clips.append(path)
        labels.append(str(bpm))
        targets.append(float(bpm))
    extract_concept(tiny, "tempos", clips, labels, root / "features", settings=ExtractionSettings(batch_size=6),
                    targets=targets, load_audio=lambda p, r: read_wav(p)[0], progress=False)
    return str(root / "features")


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture
def count_generations(monkeypatch):
    calls = []  # the steering spec of every clip generated
    real = run.generate_many

    def counting(model, renders, *args, **kwargs):
        calls.extend(r.spec for r in renders)
        return real(model, renders, *args, **kwargs)

    monkeypatch.setattr(run, "generate_many", counting)
    return calls


# --- presets as data ---------------------------------------------------------------------------------


def test_presets_follow_the_papers_protocols():
    classes = {"notes": NOTES, "chords": ["major", "minor"], "intervals": ["m2", "M3"], "tempos": ["faster"]}
    # The paper's levels are raw units (hidden-state units of MusicGen-large); relative units have their own.
    relative = build_configurations("eta", ["notes"], classes, 48, 10.0)
    assert [c.controls[0].coefficient for c in relative] == [0.1, 0.25, 0.5, 1.0]
    assert build_configurations("crossfade", ["notes"], classes, 48, 10.0)[0].controls[0].coefficient == 0.5
    eta = build_configurations("eta", ["notes", "tempos"], classes, 48, 10.0, units="raw")
    notes = [c for c in eta if c.name.startswith("notes")]
    assert [c.controls[0].coefficient for c in notes] == [0.15, 0.30, 0.45, 0.60]
    assert all(c.gate_p == 0.3 and c.layers == LayerWeighting("exponential", kappa=0.95, w0=1.0) for c in eta)
    tempos = [c for c in eta if c.name.startswith("tempos")]  # Table 2: +-eta0 averaged into |eta0|
    assert len(tempos) == 8 and {c.controls[0].group for c in tempos} == {f"tempos |eta0|={e:.2f}"
                                                                          for e in (0.15, 0.3, 0.45, 0.6)}
    pairs = build_configurations("pairs", ["notes", "chords", "intervals"], classes, 48, 10.0, units="raw")
    assert len(pairs) == 3 * 4  # Table 5: 3 pairs x {0.3, 0.6}^2, grouped by attribute
    assert {c.controls[0].group for c in pairs} >= {"notes eta0=0.30", "notes eta0=0.60", "chords eta0=0.30"}
    # Table 6 / App. E at 30 s exactly; shorter clips get the same shapes over their length.
    sched = {c.name: c.controls[0].schedule for c in build_configurations("schedules", ["notes"], classes, 48, 30.0)}
    assert sched["notes linear increase"] == Schedule("linear_rise", length=1500)
    assert sched["notes linear decay"] == Schedule("linear_decay", length=1500)
    assert sched["notes exponential decay"].lam == pytest.approx(0.998)
    assert sched["notes logistic increase"] == Schedule("logistic", center=750.0, width=200.0)
    assert sched["notes sine modulation"] == Schedule("sine", period=1500.0)
    short = build_configurations("schedules", ["notes"], classes, 48, 10.0)[2].controls[0].schedule
    assert short.lam ** 500 == pytest.approx(0.998 ** 1500)
    # Sec. 6.2: n1 decays linearly while n2 rises over the window, eta0 0.45.
    (xf,) = build_configurations("crossfade", ["notes"], classes, 48, 30.0, units="raw")
    a, b = crossfade("notes:C", "notes:G", 0.45, length=1500, curve="linear")
    assert [t.schedule for t in xf.controls] == [a.schedule, b.schedule]
    assert [t.coefficient for t in xf.controls] == [0.45, 0.45] and [t.role for t in xf.controls] == ["n1", "n2"]
    # App. C: the ablations vary one knob from the shared naive row (uniform layers, p = 1).
    layers = build_configurations("layers", ["notes"], classes, 48, 10.0)
    assert [c.layers.mode for c in layers] == ["linear", "exponential", "exponential", "exponential", "all"]
    assert [c.layers.kappa for c in layers[1:4]] == [0.98, 0.95, 0.92] and {c.gate_p for c in layers} == {1.0}
    topk = build_configurations("topk", ["notes"], classes, 48, 10.0)
    assert [c.layers.k for c in topk] == [4, 8, 12, 16, 24, 32, 48] and {c.gate_p for c in topk} == {1.0}
    assert topk_values(24) == [2, 4, 6, 8, 12, 16, 24] and topk_values(4) == [1, 2, 3, 4]
    gate = build_configurations("gate", ["notes"], classes, 48, 10.0)
    assert [c.gate_p for c in gate] == [0.15, 0.30, 0.45, 0.6, 0.75, 0.9, 1.0]
    assert {c.layers.mode for c in gate} == {"all"}
    with pytest.raises(ValueError, match="not in the bank"):
        build_configurations("eta", ["scales"], classes, 48, 10.0)
    with pytest.raises(ValueError, match="two classification concepts"):
        build_configurations("pairs", ["notes"], classes, 48, 10.0)


def test_units_are_seeded_by_sample_index_alone(banks):
    classes = {"notes": NOTES, "chords": ["major", "minor"]}
    configs = build_configurations("pairs", ["notes", "chords"], classes, 4, 1.0)
    two = plan_units(SweepSettings("pairs", (banks["notes"],), "x", samples=2), configs, classes)
    four = plan_units(SweepSettings("pairs", (banks["notes"],), "x", samples=4), configs, classes)
    by_key = {u.key: u for u in four}
    assert all(by_key[u.key] == u for u in two)  # more samples never change the first ones
    ref = [u for u in four if u.config == REFERENCE]
    assert len(ref) == 4 and all(u.spec is None for u in ref)
    for u in four:  # paired design: sample i has one prompt and seed in every configuration
        assert (u.seed, u.prompt) == (ref[u.sample].seed, ref[u.sample].prompt)
        if u.spec is not None:
            assert u.spec.gate_seed == u.seed
    notes_targets = [u.targets[0]["class"] for u in four if u.config == configs[0].name]
    assert notes_targets == ["C", "G", "D", "C"]  # the first control cycles through the classes
    other = SweepSettings("crossfade", (banks["notes"],), "x", samples=6)
    xf = build_configurations("crossfade", ["notes"], classes, 4, 1.0)
    for u in plan_units(other, xf, classes)[6:]:
        assert u.targets[0]["class"] != u.targets[1]["class"]


def test_the_embedder_is_chosen_recorded_and_checked(banks):
    timbre = SweepSettings("eta", (banks["notes"],), "x", embedder="logmel-timbre-v1")
    assert timbre.embedder_name == timbre.manifest()["embedder"] == "logmel-timbre-v1"
    assert SweepSettings("eta", (banks["notes"],), "x", embedder="logmel-timbre-v1", clap="c").embedder_name == "clap:c"
    with pytest.raises(ValueError, match="unknown embedder 'mfcc'"):
        SweepSettings("eta", (banks["notes"],), "x", embedder="mfcc")


# --- end to end on tiny-random -------------------------------------------------------------------------


def test_eta_sweep_end_to_end_and_resume(tiny, banks, tmp_path, count_generations):
    out = tmp_path / "eta"
    settings = SweepSettings("eta", (banks["notes"],), str(out), samples=2, seconds=1.0, eta0=(2.0, 4.0),
                             prompts=("warm piano", "dark drone"), chunk=1)
    result = run_sweep(settings, model=tiny, progress=False)
    assert result.generated == 6 and result.skipped == 0 and len(count_generations) == 6
    rows = _rows(out / "results.csv")
    assert [r["group"] for r in rows] == ["reference (unsteered)", "notes eta0=2.00", "notes eta0=4.00"]
    for r in rows:
        assert r["note"] == NOISE_LABEL and r["embedding"] == "logmel-stats-v1" and r["n_ref"] == "2"
        assert r["clap"] == "unavailable" and r["probe_acc"] == "unavailable: no --features given"
        assert r["check"].startswith("pitch class") and 0.0 <= float(r["check_acc"]) <= 1.0
    for r in rows[1:]:
        assert float(r["fd"]) >= 0 and np.isfinite(float(r["mmd2"])) and r["n_clips"] == "2"
    # what a strength meant: its units, and the mean norm it added per layer (relative: x times the layer norms)
    assert {r["units"] for r in rows} == {"relative"} and rows[0]["vector_norm"] == ""
    assert float(rows[2]["vector_norm"]) > float(rows[1]["vector_norm"]) > 0
    clips = _rows(out / "clips.csv")
    assert all(float(c["vector_norm"]) > 0 for c in clips if c["config"] != REFERENCE)
    assert len(clips) == 6 and {c["note"] for c in clips} == {NOISE_LABEL}
    ref = {c["sample"]: c["tokens_sha256"] for c in clips if c["config"] == REFERENCE}
    steered = [c for c in clips if c["config"] != REFERENCE]
    assert {c["class"] for c in steered} == {"C", "G"} and {c["prompt"] for c in steered} == {"warm piano", "dark drone"}
    assert any(c["tokens_sha256"] != ref[c["sample"]] for c in steered)  # steering changed the clips
    assert (out / "metrics.png").stat().st_size > 10_000
    summary = (out / "summary.md").read_text()
    assert NOISE_LABEL in summary and "logmel-stats-v1" in summary and "Table 2" in summary
    assert "CLAP score: unavailable" in summary
    assert json.loads((out / "sweep.json").read_text())["embedder"] == "logmel-stats-v1"

    # A rerun finds every unit done and generates nothing; the outputs are the same.
    before = (out / "results.csv").read_text()
    again = run_sweep(settings, model=tiny, progress=False)
    assert again.generated == 0 and again.skipped == 6 and len(count_generations) == 6
    assert (out / "results.csv").read_text() == before
    # An interrupted run (two records lost, the last line cut) redoes exactly those units.
    lines = (out / "units.jsonl").read_text().splitlines()
    (out / "units.jsonl").write_text("\n".join(lines[:4]) + "\n" + lines[4][:40])
    again = run_sweep(settings, model=tiny, progress=False)
    assert again.generated == 2 and len(count_generations) == 8
    assert (out / "results.csv").read_text() == before
    # More samples: only the new sample's units run.
    more = SweepSettings(**{**settings.__dict__, "samples": 3})
    assert run_sweep(more, model=tiny, progress=False).generated == 3
    # Other settings never mix into the same directory.
    with pytest.raises(ValueError, match="seconds"):
        run_sweep(SweepSettings(**{**settings.__dict__, "seconds": 2.0}), model=tiny, progress=False)


def test_tempo_bank_is_used_apart_and_signs_pool_into_abs_eta(tiny, banks, tempo_features, tmp_path):
    # Each unit generates with its own concept's bank (a tempo bank is scored by R², the others by AUC).
    fp = tiny.fingerprint
    tempo = DirectionBank.from_arrays("tempos", ["faster"], torch.randn(1, fp.num_layers, fp.hidden_size),
                                      torch.rand(1, fp.num_layers), fp, method="test", pooling="mean", score_name="r2")
    tempo.save(tmp_path / "tempos.safetensors")
    out = tmp_path / "eta"
    settings = SweepSettings("eta", (banks["notes"], str(tmp_path / "tempos.safetensors")), str(out),
                             concepts=("notes", "tempos"), samples=2, seconds=1.0, eta0=(3.0,),
                             features=tempo_features, probe_trials=4)
    result = run_sweep(settings, model=tiny, progress=False)
    assert result.generated == 2 * 4
    rows = {(r["group"], r["concept"]): r for r in _rows(out / "results.csv")}
    assert set(rows) == {("reference (unsteered)", "notes"), ("reference (unsteered)", "tempos"),
                         ("notes eta0=3.00", "notes"), ("tempos |eta0|=3.00", "tempos")}
    pooled = rows[("tempos |eta0|=3.00", "tempos")]
    assert pooled["configurations"] == "tempos eta0=-3.00;tempos eta0=+3.00" and pooled["n_clips"] == "4"
    # tempo is a regression: its check reads a BPM per clip (no accuracy), reported as a shift from the reference
    assert pooled["check"].startswith("tempo in BPM") and pooled["check_acc"] == "" and pooled["check_n"] == "0"
    for group in ("reference (unsteered)", "tempos |eta0|=3.00"):
        assert float(rows[(group, "tempos")]["bpm"]) > 0
    assert np.isfinite(float(pooled["bpm_shift_up"])) and np.isfinite(float(pooled["bpm_shift_down"]))
    assert rows[("notes eta0=3.00", "notes")]["bpm"] == ""  # only tempo rows read a BPM
    tempo_clips = [c for c in _rows(out / "clips.csv") if c["concept"] == "tempos"]
    assert len(tempo_clips) == 6 and all(c["check_pred"].endswith(" BPM") and float(c["check_bpm"]) > 0
                                         for c in tempo_clips)
    summary = (out / "summary.md").read_text()
    assert "shift up (BPM)" in summary and (out / "tempo.png").stat().st_size > 5_000
    assert "| tempos \\|eta0\\|=3.00 | 4 |" in summary  # the group's pipes escaped: the row keeps its cells
    # with tempo features the tempo regressor reads each clip too (a BPM, no accuracy); notes has no features here
    assert pooled["probe_acc"].startswith("n/a: regression concept") and pooled["probe_n"] == "0"
    assert all(np.isfinite(float(pooled[k])) for k in ("probe_bpm", "probe_bpm_shift_up", "probe_bpm_shift_down"))
    assert all(c["probe_pred"].endswith(" BPM") and np.isfinite(float(c["probe_bpm"])) for c in tempo_clips)
    assert rows[("notes eta0=3.00", "notes")]["probe_acc"].startswith("unavailable: no features of notes")
    assert "RFM tempo regressor for tempos at layer" in (out / "summary.md").read_text()


def test_bpm_shift_is_the_median_change_from_the_same_seed_reference():
    from musicrfm.evaluation.report import _bpm_columns

    ref = {0: 100.0, 1: 120.0, 2: 90.0}

    def target(coefficient, bpm):
        return {"coefficient": coefficient, "check": {"bpm": bpm, "correct": None}}

    pairs = [(0, target(3.0, 110.0)), (1, target(3.0, 150.0)), (2, target(3.0, 95.0)),  # +10, +30, +5
             (0, target(-3.0, 80.0)), (1, target(-3.0, float("nan"))), (2, target(-3.0, 70.0))]  # -20, -, -20
    assert _bpm_columns(pairs, ref) == {"bpm": 95.0, "bpm_shift_up": 10.0, "bpm_shift_down": -20.0}
    assert _bpm_columns([(0, {"coefficient": 1.0, "check": {"pred": "C", "correct": True}})], ref) == {}


@pytest.fixture(scope="module")
def theory_banks(tiny, tmp_path_factory):
    """Random directions for tiny-random over a few classes of each concept that has a check besides notes/chords."""
    fp, g = tiny.fingerprint, torch.Generator().manual_seed(1)
    root = tmp_path_factory.mktemp("theory-banks")
    classes = {"intervals": ["3", "7"], "scales": ["dorian", "lydian"], "time_signatures": ["(3, 4)", "(6, 8)"],
               "chord_progressions": ["ionian-(1, 4, 5, 1)", "aeolian-(1, 6, 3, 7)"]}
    paths = []
    for concept, names in classes.items():
        bank = DirectionBank.from_arrays(concept, names, torch.randn(len(names), fp.num_layers, fp.hidden_size,
                                                                     generator=g),
                                         torch.rand(len(names), fp.num_layers, generator=g), fp, method="test",
                                         pooling="mean")
        bank.save(root / f"{concept}.safetensors")
        paths.append(str(root / f"{concept}.safetensors"))
    return classes, tuple(paths)


def test_every_theory_concept_is_checked_in_sweeps(tiny, theory_banks, tmp_path, monkeypatch):
    # tiny-random's audio is noise: this checks the plumbing (which check, its labels, accuracy toward the
    # steered class), not whether steering works
    from musicrfm.evaluation import report
    from musicrfm.evaluation.audio_checks import METER_PULSES, SCALE_MODES
    from musicrfm.evaluation.measure import PROGRESSION_CLASSES, SIGNATURE_PULSES

    monkeypatch.setattr(report, "_plot_metrics", lambda *args: None)  # the figure has tests of its own; time
    classes, paths = theory_banks
    out = tmp_path / "theory"
    settings = SweepSettings("eta", paths, str(out), concepts=tuple(classes), samples=2, seconds=0.5, eta0=(3.0,),
                             chunk=8)
    run_sweep(settings, model=tiny, progress=False)
    rows = {(r["group"], r["concept"]): r for r in _rows(out / "results.csv")}
    names = {"intervals": "interval size", "scales": "scale mode", "time_signatures": "pulses per bar",
             "chord_progressions": "chord progression"}
    for concept, name in names.items():
        for group in ("reference (unsteered)", f"{concept} eta0=3.00"):
            r = rows[(group, concept)]
            assert r["check"].startswith(name) and r["check_n"] == "2" and 0.0 <= float(r["check_acc"]) <= 1.0
    clips = _rows(out / "clips.csv")
    allowed = {"intervals": {str(k) for k in range(1, 13)}, "scales": set(SCALE_MODES),
               "time_signatures": {f"{k} per bar" for k in METER_PULSES},
               "chord_progressions": set(PROGRESSION_CLASSES)}
    for c in clips:
        assert c["check_pred"] in allowed[c["concept"]], c
        if c["concept"] == "time_signatures":
            assert (c["check_correct"] == "1") == (c["check_pred"] == f"{SIGNATURE_PULSES[c['class']]} per bar")
        elif c["concept"] != "chord_progressions":  # a progression's relative-key twin also counts
            assert (c["check_correct"] == "1") == (c["check_pred"] == c["class"])
    assert {c["class"] for c in clips if c["concept"] == "scales"} == {"dorian", "lydian"}
    summary = (out / "summary.md").read_text()
    assert all(f"{concept}: {name}" in summary for concept, name in names.items())


def test_schedules_probe_accuracy_and_traces(tiny, banks, features, tmp_path):
    out = tmp_path / "schedules"
    settings = SweepSettings("schedules", (banks["notes"],), str(out), samples=2, seconds=2.0, eta0=(3.0,),
                             features=features, probe_trials=4)
    run_sweep(settings, model=tiny, progress=False)
    rows = _rows(out / "results.csv")
    assert len(rows) == 6 and rows[0]["group"] == "reference (unsteered)"
    for r in rows:  # the probe was fitted at one layer and applied to features re-extracted from the clips
        assert 0.0 <= float(r["probe_acc"]) <= 1.0 and r["probe_n"] == "2" and r["probe_layer"] in "0123"
        assert 0.0 < float(r["probe_p_target"]) < 1.0
    cached = json.loads((out / "probe.json").read_text())["notes"]
    assert str(cached["layer"]) == rows[0]["probe_layer"]
    traces = _rows(out / "traces.csv")
    configs = {r["config"] for r in traces}
    assert configs == {REFERENCE} | {r["group"] for r in rows[1:]}
    for source in ("probe", "check"):  # Fig. 1a: 1 s windows every 0.5 s over the 2 s clips
        times = sorted({float(r["t"]) for r in traces if r["source"] == source and r["config"] == REFERENCE})
        assert times == [0.5, 1.0, 1.5]
    assert all(r["n"] == "2" and r["note"] == NOISE_LABEL for r in traces)
    assert (out / "traces.png").stat().st_size > 10_000 and (out / "metrics.png").is_file()
    assert "multiclass RFM probe for notes at layer" in (out / "summary.md").read_text()


def test_cli_eval_sweep_with_clap(banks, tmp_path, capsys):
    from test_metrics import (
        _save_tiny_clap,  # a random-weight ClapModel saved with save_pretrained
    )

    (tmp_path / "clap").mkdir()
    clap = _save_tiny_clap(tmp_path / "clap")
    out = tmp_path / "gate"
    code = cli_main(["eval", "sweep", "--preset", "pairs", "--model", "tiny-random", "--bank", banks["notes"],
                     "--bank", banks["chords"], "--concept", "notes,chords", "--prompts", "warm piano,dark drone",
                     "--samples", "2", "--seconds", "1", "--eta0", "3", "--out", str(out), "--clap", str(clap),
                     "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "4 clips generated" in captured.out and NOISE_LABEL in captured.out
    rows = _rows(out / "results.csv")
    # Table 5's layout: reference rows, then one row per (attribute, eta0) pooled over pairings.
    assert [(r["group"], r["concept"]) for r in rows] == [
        ("reference (unsteered)", "notes"), ("reference (unsteered)", "chords"),
        ("notes eta0=3.00", "notes"), ("chords eta0=3.00", "chords")]
    for r in rows:
        assert r["embedding"] == f"clap:{clap}" and -1.0 <= float(r["clap"]) <= 1.0
    assert rows[3]["check"].startswith("chord quality")
    assert f"CLAP score vs the prompt with `{clap}`" in (out / "summary.md").read_text()


def test_ray_run_equals_the_local_run(tiny, banks, features, tmp_path):
    try:
        import ray
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("CI must install Ray for this test: pip install -e '.[ray]'")
        pytest.skip("ray is not installed (pip install -e '.[ray]')")
    common = {"banks": (banks["notes"],), "samples": 3, "seconds": 1.0, "eta0": (3.0,), "features": features,
              "probe_trials": 4, "chunk": 2, "threads": 1}
    local = run_sweep(SweepSettings("crossfade", out=str(tmp_path / "local"), **common), model=tiny, progress=False)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        remote = run_sweep(SweepSettings("crossfade", out=str(tmp_path / "ray"), **common), ray="auto",
                           progress=False)
    finally:
        ray.shutdown()
    assert local.generated == remote.generated == 6
    for name in ("results.csv", "clips.csv", "traces.csv"):
        assert (tmp_path / "ray" / name).read_text() == (tmp_path / "local" / name).read_text(), name
    rows = _rows(tmp_path / "ray" / "results.csv")
    assert [(r["group"], r["role"]) for r in rows] == [("reference (unsteered)", ""),
                                                       ("notes crossfade n1->n2", "n1"),
                                                       ("notes crossfade n1->n2", "n2")]
    workers = {json.loads(line)["worker"] for line in (tmp_path / "ray" / "units.jsonl").read_text().splitlines()}
    assert len(workers) == 2  # the work really was split (chunks of 2 samples over 2 workers)


def test_check_clip_judges_known_classes_only_and_never_stops_a_sweep_on_a_short_tempo_clip():
    from musicrfm.evaluation.measure import check_clip

    t = np.arange(32000) / 32000
    fifth = (np.sin(2 * np.pi * 261.63 * t) + np.sin(2 * np.pi * 392.0 * t)).astype(np.float32)  # C4 + G4
    assert check_clip("intervals", "7", fifth, 32000) == {"pred": "7", "correct": True, "score": pytest.approx(
        check_clip("intervals", "4", fifth, 32000)["score"])}
    assert check_clip("intervals", "4", fifth, 32000)["correct"] is False
    # classes the checks do not know (a bank trained on other labels): no check rather than a wrong one
    assert check_clip("intervals", "13", fifth, 32000) is None
    assert check_clip("time_signatures", "(5, 4)", fifth, 32000) is None
    assert check_clip("scales", "bebop", fifth, 32000) is None
    short = check_clip("tempos", "faster", fifth[:3200], 32000)  # 0.1 s holds no beat
    assert short["pred"].startswith("no tempo: clip too short") and np.isnan(short["bpm"]) and short["correct"] is None


def test_methods_preset_compares_musicrfm_and_linear_probe_steering_at_matched_strength(tiny, banks, tmp_path):
    """The methods preset: per matched strength m, MusicRFM (residual bank, exponential weighting, add, relative
    s = m / sum_l w_l) and linear-probe steering (attention bank, its chosen layer alone, norm-preserving, raw
    alpha = m / (1 - m)); each unit steers with its own site's bank; the summary puts them side by side."""
    from musicrfm.engine.bank import LayerNorms
    from musicrfm.evaluation.presets import OPTIMAL_LAYERS, method_banks

    fp, g = tiny.fingerprint, torch.Generator().manual_seed(1)
    norms = LayerNorms((2.0,) * fp.num_layers, (0.1,) * fp.num_layers, 10, "test")
    residual = DirectionBank.load(banks["notes"]).with_layer_norms(norms)
    residual.save(tmp_path / "notes.rfm.safetensors")
    DirectionBank.from_arrays("notes", NOTES, torch.randn(3, fp.num_layers, fp.hidden_size, generator=g),
                              torch.rand(3, fp.num_layers, generator=g), fp, method="linear", pooling="mean",
                              injection_point="attention", metadata={"layer_choice": {"layer": 1}}
                              ).save(tmp_path / "notes.linear.safetensors")
    paths = (str(tmp_path / "notes.rfm.safetensors"), str(tmp_path / "notes.linear.safetensors"))

    info = method_banks(paths, ["notes"])["notes"]
    sums = [float(OPTIMAL_LAYERS.weights(residual[f"notes:{c}"].scores).sum()) for c in NOTES]
    assert info.chosen_layer == 1 and info.weight_sum == pytest.approx(sum(sums) / 3)
    configs = build_configurations("methods", ["notes"], {"notes": NOTES}, fp.num_layers, 1.0, eta0=(0.2, 0.6),
                                   methods={"notes": info})
    assert [c.name for c in configs[:4]] == [
        "notes musicrfm m=0.20", "notes linear-probe m=0.20", "notes crossed: linear bank, musicrfm steering m=0.20",
        "notes crossed: rfm bank, linear-probe steering m=0.20"] and len(configs) == 8
    rfm_cfg, linear_cfg, crossed_linear, crossed_rfm = configs[4:]
    assert rfm_cfg.controls[0].coefficient * info.weight_sum == pytest.approx(0.6)  # s x sum_l w_l = m
    alpha = linear_cfg.controls[0].coefficient
    assert alpha / (1 + alpha) == pytest.approx(0.6)  # the norm rule's push alpha / (1 + alpha) = m
    assert (rfm_cfg.site, rfm_cfg.rule, rfm_cfg.units, rfm_cfg.layers, rfm_cfg.gate_p) == (
        "residual", "add", "relative", OPTIMAL_LAYERS, 1.0)
    assert (linear_cfg.site, linear_cfg.rule, linear_cfg.units, linear_cfg.gate_p) == ("attention", "norm", "raw", 1.0)
    assert linear_cfg.layers == LayerWeighting.single(1, fp.num_layers)
    # The crossed pair swaps the recipes: each bank steered the other method's way, at the same m.
    assert (crossed_linear.site, crossed_linear.rule, crossed_linear.layers) == ("attention", "add", OPTIMAL_LAYERS)
    assert crossed_linear.controls[0].coefficient * info.linear_weight_sum == pytest.approx(0.6)
    assert (crossed_rfm.site, crossed_rfm.rule, crossed_rfm.layers) == ("residual", "norm", linear_cfg.layers)
    with pytest.raises(ValueError, match="must be in \\(0, 1\\)"):
        build_configurations("methods", ["notes"], {"notes": NOTES}, fp.num_layers, 1.0, eta0=(1.0,),
                             methods={"notes": info})
    with pytest.raises(ValueError, match="no attention bank of 'notes'"):
        method_banks(paths[:1], ["notes"])

    settings = SweepSettings(preset="methods", banks=paths, out=str(tmp_path / "sweep"), concepts=("notes",),
                             samples=2, seconds=0.1, eta0=(0.5,), prompts=("a", "b"))
    result = run_sweep(settings, progress=False, model=tiny)
    records = [json.loads(line) for line in (tmp_path / "sweep" / "units.jsonl").read_text().splitlines()]
    linear = [r for r in records if r["config"] == "notes linear-probe m=0.50"]
    assert len(linear) == 2 and all(r["steering"]["site"] == "attention" and r["steering"]["rule"] == "norm"
                                    and r["steering"]["units"] == "raw" for r in linear)
    assert {r["units"] for r in result.rows if "linear-probe" in r["group"]} == {"raw"}
    with pytest.raises(ValueError, match="steers notes at the residual site, but its bank was read at: attention"):
        run_sweep(SweepSettings(preset="eta", banks=paths[1:], out=str(tmp_path / "eta"), samples=2, seconds=0.1),
                  progress=False, model=tiny)
    summary = (tmp_path / "sweep" / "summary.md").read_text()
    assert "| concept | m | musicrfm check acc | musicrfm FD" in summary and "| notes | 0.5 |" in summary


def test_the_command_line_offers_every_preset():
    """evaluation/cli.py writes the preset names out (its parser loads without torch): they are presets.PRESETS."""
    import argparse

    from musicrfm.evaluation import cli
    from musicrfm.evaluation.presets import PRESETS

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    sweep = parser._subparsers._group_actions[0].choices["eval"]._subparsers._group_actions[0].choices["sweep"]
    preset = next(a for a in sweep._actions if a.dest == "preset")
    assert tuple(preset.choices) == PRESETS
