"""Independent concept checks (evaluation/audio_checks.py): synthetic signals with known answers, then real
SynTheory clips rendered with the TimGM6mb soundfont (skipped without it).

Rendered samples are seeded draws from the *full* plans (all 92 programs; all roots, inversions,
tempos and click setups), rendered in-process with `musicrfm.probes.syntheory.render_clip` (~5 s in all).
Measured on larger samples with bench/bench_checks.py (docs/evaluation.md): pitch class 0.984
(674 notes clips, octaves 2-7), chord quality 0.988 (1,000 clips), tempo within 4 % or an
octave 1.000 (450 clips). The interval, scale, meter and progression checks are tested here on synthetic
signals only (planted answers); their accuracy on renders is measured by bench/bench_checks.py (--seed 123:
0.973, 0.983, 0.946 pulses per bar, 0.927 strict / 0.997 with the relative-key twin).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from musicrfm.evaluation import audio_checks
from musicrfm.probes import syntheory as st

SR = 32_000
needs_soundfont = pytest.mark.skipif(
    not Path(st.DEFAULT_SOUNDFONT).is_file(),
    reason=f"{st.DEFAULT_SOUNDFONT} missing: apt-get install timgm6mb-soundfont",
)


def _harmonic(f0: float, amplitudes, seconds: float = 2.0, sr: int = SR) -> np.ndarray:
    """A tone with the given partial amplitudes (partial h at h * f0), decaying like a pluck."""
    t = np.arange(int(seconds * sr)) / sr
    tone = sum(a * np.sin(2 * np.pi * f0 * h * t) for h, a in enumerate(amplitudes, start=1) if a)
    return (tone * np.exp(-t)).astype(np.float32)


def _midi_hz(midi: float) -> float:
    return 440.0 * 2 ** ((midi - 69) / 12)


# ------------------------------------------------------------------------------------------
# Synthetic signals


def test_fundamental_class_beats_a_loud_third_harmonic():
    # A2 whose 3rd harmonic (E4) is the loudest partial: the raw FFT chroma names E, the
    # harmonic-sum profile names A
    tone = _harmonic(_midi_hz(45), [0.5, 0.6, 1.0, 0.4, 0.3, 0.2])
    assert int(np.argmax(audio_checks.fft_chroma(tone, SR))) == 4  # E: the raw chroma is fooled
    pitch_class, confidence = audio_checks.estimate_pitch_class(tone, SR)
    assert pitch_class == 9 and 1 / 12 < confidence <= 1.0
    profile = audio_checks.pitch_class_profile(tone, SR)
    assert profile.shape == (12,) and profile.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("midi", [28, 43, 55, 61, 70, 84, 96])
def test_pitch_class_of_synthetic_tones(midi):
    assert audio_checks.estimate_pitch_class(_harmonic(_midi_hz(midi), [1.0, 0.5, 0.33, 0.25, 0.2]), SR)[0] == midi % 12
    # missing fundamental (partials 2-6 only) and a 30-cent detuning: still the same class
    assert audio_checks.estimate_pitch_class(_harmonic(_midi_hz(midi), [0, 1.0, 0.8, 0.6, 0.4, 0.3]), SR)[0] == midi % 12
    assert audio_checks.estimate_pitch_class(_harmonic(_midi_hz(midi + 0.3), [1.0, 0.5, 0.33]), SR)[0] == midi % 12
    # any sample rate
    assert audio_checks.estimate_pitch_class(_harmonic(_midi_hz(midi), [1.0, 0.5], sr=44_100), 44_100)[0] == midi % 12


@pytest.mark.parametrize("quality", audio_checks.CHORD_QUALITIES)
def test_chord_quality_of_synthetic_triads(quality):
    for root in (0, 5, 10):
        midi = [57 + root + i for i in audio_checks.CHORD_TEMPLATES[quality]]
        audio = sum(_harmonic(_midi_hz(m), [1.0, 0.5, 0.3, 0.2]) for m in midi)
        found, found_root, score = audio_checks.estimate_chord_quality(audio, SR)
        assert found == quality
        assert (found_root - (57 + root)) % (4 if quality == "aug" else 12) == 0
        assert 0.5 < score <= 1.0


def _clicks(bpm: float, seconds: float = 8.0, sr: int = SR, accent: int = 4) -> np.ndarray:
    rng = np.random.default_rng(int(bpm))
    audio = 0.01 * rng.standard_normal(int(seconds * sr))
    burst = np.exp(-np.arange(int(0.03 * sr)) / (0.005 * sr)) * rng.standard_normal(int(0.03 * sr))
    for i, start in enumerate(np.arange(0.1, seconds - 0.05, 60.0 / bpm)):
        at = int(start * sr)
        piece = burst[: len(audio) - at] * (1.0 if i % accent == 0 else 0.6)
        audio[at : at + len(piece)] += piece
    return audio.astype(np.float32)


@pytest.mark.parametrize("bpm", [50, 72, 97, 120, 150, 203])
def test_tempo_of_synthetic_click_tracks(bpm):
    estimate = audio_checks.estimate_tempo(_clicks(bpm), SR)
    assert audio_checks.tempo_matches(estimate, bpm), estimate


def test_tempo_matches_accepts_octave_errors_only():
    assert audio_checks.tempo_matches(120, 120) and audio_checks.tempo_matches(240, 120) and audio_checks.tempo_matches(60, 120)
    assert audio_checks.tempo_matches(124.7, 120) and audio_checks.tempo_matches(249, 120) and audio_checks.tempo_matches(57.7, 120)
    assert not audio_checks.tempo_matches(125.0, 120)  # 4.2 % off
    assert not audio_checks.tempo_matches(180, 120) and not audio_checks.tempo_matches(360, 120)  # x1.5, x3
    assert not audio_checks.tempo_matches(40, 120) and not audio_checks.tempo_matches(float("nan"), 120)
    assert audio_checks.tempo_matches(125.0, 120, tol=0.05)
    with pytest.raises(ValueError, match="positive tempo"):
        audio_checks.tempo_matches(120, 0)


def test_bad_input_and_silence():
    with pytest.raises(ValueError, match="1-D mono"):
        audio_checks.estimate_pitch_class(np.zeros((2, 100)), SR)
    with pytest.raises(ValueError, match="NaN"):
        audio_checks.estimate_tempo(np.array([0.0, np.nan] * 1000), SR)
    with pytest.raises(ValueError, match="sample rate"):
        audio_checks.pitch_class_profile(np.zeros(100), 0)
    with pytest.raises(ValueError, match="empty"):
        audio_checks.estimate_chord_quality(np.zeros(0), SR)
    with pytest.raises(ValueError, match="too short"):
        audio_checks.estimate_tempo(np.zeros(SR // 4), SR)
    silence = np.zeros(SR)
    assert np.isnan(audio_checks.estimate_tempo(silence, SR))  # no onsets: no tempo, and no match
    steady = np.sin(2 * np.pi * 440.0 * np.arange(2 * SR) / SR)
    assert np.isnan(audio_checks.estimate_tempo(steady, SR)) and not audio_checks.tempo_matches(np.nan, 120)
    assert audio_checks.estimate_pitch_class(silence, SR) == (0, 0.0)
    assert not audio_checks.pitch_class_profile(silence, SR).any()
    assert audio_checks.estimate_chord_quality(silence, SR)[2] == 0.0


# ------------------------------------------------------------------------------------------
# Rendered SynTheory clips

SAMPLE_SEED = 2024


def _sample(concept: str, count: int, keep=lambda clip: True) -> list[st.ClipSpec]:
    plan = [clip for clip in st.plan_clips(concept, "full", seed=0) if keep(clip)]
    rng = np.random.default_rng([SAMPLE_SEED, st.CONCEPTS.index(concept)])
    return [plan[i] for i in sorted(rng.choice(len(plan), count, replace=False))]


@pytest.fixture(scope="module")
def rendered_sample():
    """{concept: [(clip, audio)]}: 48 notes clips (octaves 2-7, C1-B6, where the soundfont's
    notes have a fundamental above 30 Hz), 24 chords clips and 12 tempo crops, seeded. Silent
    renders (a program with no sample at that pitch) are left out."""
    out = {}
    for concept, count, keep in (
        ("notes", 48, lambda clip: 2 <= dict(clip.columns)["octave"] <= 7),
        ("chords", 24, lambda clip: True),
        ("tempos", 12, lambda clip: True),
    ):
        clips = [(clip, st.render_clip(clip)) for clip in _sample(concept, count, keep)]
        out[concept] = [(clip, audio) for clip, audio in clips if audio.any()]
        assert len(out[concept]) >= count - 2, f"{count - len(out[concept])} silent {concept} renders"
    return out


@needs_soundfont
def test_pitch_class_on_rendered_notes(rendered_sample):
    results = []
    for clip, audio in rendered_sample["notes"]:
        predicted, _ = audio_checks.estimate_pitch_class(audio, st.SAMPLE_RATE)
        results.append((predicted == dict(clip.columns)["root_note_pitch_class"], clip.stem))
    accuracy = np.mean([hit for hit, _ in results])
    print(f"pitch class accuracy on {len(results)} rendered notes clips: {accuracy:.3f}")
    assert accuracy >= 0.9, (accuracy, [stem for hit, stem in results if not hit])


@needs_soundfont
def test_chord_quality_on_rendered_chords(rendered_sample):
    # Measured 0.988 on 1,000 clips of the full plan (bench/bench_checks.py --seed 7); asserted
    # >= 0.9 here (22 of 24): a random 24-clip sample at that rate falls below with p ~ 0.3 %.
    results, roots = [], []
    for clip, audio in rendered_sample["chords"]:
        columns = dict(clip.columns)
        quality, root, _ = audio_checks.estimate_chord_quality(audio, st.SAMPLE_RATE)
        results.append((quality == columns["chord_type"], clip.stem, quality))
        if quality == columns["chord_type"]:
            roots.append((root - columns["root_note_pitch_class"]) % (4 if quality == "aug" else 12) == 0)
    accuracy = np.mean([hit for hit, *_ in results])
    print(f"chord quality accuracy on {len(results)} rendered chords clips: {accuracy:.3f}")
    assert accuracy >= 0.9, (accuracy, [(stem, q) for hit, stem, q in results if not hit])
    assert np.mean(roots) >= 0.9  # measured 1.000 (aug roots compared modulo 4)


@needs_soundfont
def test_tempo_on_rendered_click_tracks(rendered_sample):
    results = []
    for clip, audio in rendered_sample["tempos"]:
        estimate = audio_checks.estimate_tempo(audio, st.SAMPLE_RATE)
        results.append((audio_checks.tempo_matches(estimate, float(clip.label)), clip.stem, round(estimate, 1)))
    accuracy = np.mean([hit for hit, *_ in results])
    print(f"tempo accuracy (4 % or an octave) on {len(results)} rendered tempo clips: {accuracy:.3f}")
    assert accuracy >= 0.9, (accuracy, [(stem, e) for hit, stem, e in results if not hit])


# ------------------------------------------------------------------------------------------
# Intervals, scales, meter, progressions: planted answers in synthetic signals


def _notes(midis_per_piece, seconds: float = 0.5, sr: int = SR) -> np.ndarray:
    """One piece of `seconds` per entry, each the sum of its MIDI pitches (harmonic tones, plucked)."""
    pieces = [sum(_harmonic(_midi_hz(m), [1.0, 0.5, 0.3, 0.2], seconds, sr) for m in midis)
              for midis in midis_per_piece]
    return np.concatenate(pieces).astype(np.float32)


@pytest.mark.parametrize("semitones", [1, 7, 12])
def test_interval_of_planted_melodic_intervals(semitones):
    low = 57
    for pieces in ([[low], [low + semitones]] * 4, [[low + semitones], [low]] * 4):  # up, then down
        found, lower, score = audio_checks.estimate_interval(_notes(pieces), SR)
        assert (found, lower) == (semitones, low) and 0.4 <= score <= 0.5


@pytest.mark.parametrize("semitones", [2, 7, 12])
def test_interval_of_planted_harmonic_intervals(semitones):
    found, lower, score = audio_checks.estimate_interval(_notes([[62, 62 + semitones]] * 8), SR)
    assert (found, lower) == (semitones, 62) and 0.0 < score <= 0.5


@pytest.mark.parametrize("mode,tonic", [("dorian", 2), ("lydian", 5), ("locrian", 11)])
def test_scale_of_planted_scales(mode, tonic):
    from musicrfm.probes.syntheory import MODES

    up = [[60 + tonic + step] for step in MODES[mode] + (12,)]
    for pieces in (up, up[::-1]):
        assert audio_checks.estimate_scale(_notes(pieces), SR)[:2] == (mode, tonic)


@pytest.mark.parametrize("pulses", audio_checks.METER_PULSES)
def test_meter_of_planted_accent_patterns(pulses):
    bpm = 240 if pulses in (3, 6, 9, 12) else 120  # SynTheory: eighths click in compound meters
    found, period, score = audio_checks.estimate_meter(_clicks(bpm, seconds=8.0, accent=pulses), SR)
    # the downbeat is 0.6 -> 1.0 in amplitude: 4.4 dB louder
    assert found == pulses and period == pytest.approx(60 / bpm, rel=0.03) and 3.0 < score < 6.0
    # no accent: no meter to find (a contrast near 0 dB, whatever k is returned)
    assert audio_checks.estimate_meter(_clicks(bpm, seconds=8.0, accent=1), SR)[2] < 1.0


@pytest.mark.parametrize("label,key", [("aeolian-(1, 7, 6, 4)", 4), ("ionian-(2, 5, 1, 6)", 10)])
def test_progression_of_planted_progressions(label, key):
    from musicrfm.probes.syntheory import PROGRESSIONS, _progression_label, _triad

    mode, degrees = next((m, d) for m, d in PROGRESSIONS if _progression_label(m, d) == label)
    chords = [_triad(key, mode, degree) for degree in degrees]
    found, found_key, score = audio_checks.estimate_progression(_notes(chords, seconds=1.0), SR)
    assert (found, found_key) == (label, key) and score > 0.8
    # the chord length given, with a second of silence after the progression
    audio = np.concatenate([_notes(chords, seconds=1.0), np.zeros(SR, np.float32)])
    assert audio_checks.estimate_progression(audio, SR, chord_seconds=1.0)[:2] == (label, key)


def test_relative_key_progressions_are_the_same_chords():
    assert audio_checks.same_progression("ionian-(6, 4, 1, 5)", "aeolian-(1, 6, 3, 7)")
    assert audio_checks.same_progression("ionian-(1, 4, 5, 1)", "ionian-(1, 4, 5, 1)")
    assert not audio_checks.same_progression("ionian-(1, 4, 5, 1)", "aeolian-(1, 4, 5, 1)")
    with pytest.raises(ValueError, match="unknown progression"):
        audio_checks.same_progression("I-IV-V", "ionian-(1, 4, 5, 1)")


@pytest.mark.parametrize("check", [audio_checks.estimate_interval, audio_checks.estimate_scale,
                                   audio_checks.estimate_meter, audio_checks.estimate_progression])
def test_new_checks_refuse_bad_input_and_read_silence_as_nothing(check):
    with pytest.raises(ValueError, match="empty"):
        check(np.zeros(0), SR)
    with pytest.raises(ValueError, match="NaN"):
        check(np.array([0.0, np.nan] * 4000), SR)
    with pytest.raises(ValueError, match="sample rate"):
        check(np.zeros(SR), 0)
    with pytest.raises(ValueError, match="1-D mono"):
        check(np.zeros((2, SR)), SR)
    assert check(np.zeros(2 * SR), SR)[2] == 0.0  # silence: nothing found, score 0


def test_new_checks_refuse_bad_options():
    tone = _notes([[60]] * 4)
    with pytest.raises(ValueError, match="unknown modes"):
        audio_checks.estimate_scale(tone, SR, modes=("ionian", "bebop"))
    with pytest.raises(ValueError, match="pulses per bar"):
        audio_checks.estimate_meter(tone, SR, pulses=(1, 4))
    with pytest.raises(ValueError, match="too short for 4 chords"):
        audio_checks.estimate_progression(tone, SR, chord_seconds=1.0)
    with pytest.raises(ValueError, match="segment length"):
        audio_checks.estimate_interval(tone, SR, segment_seconds=0.0)
