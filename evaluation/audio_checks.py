"""Independent concept checks: what a clip sounds like, measured from the audio alone.

These checks read the waveform with plain signal processing (numpy FFTs, no learned weights, no
MusicGen, no project probe), so they can judge whether steering toward "C" or "minor" or a tempo
actually moved the *sound*, not just the probe that produced the direction. They are deliberately
simple and their limits are stated per function; docs/evaluation.md lists the accuracy each reaches
on clips rendered by `musicrfm.probes.syntheory` (tests/evaluation/test_audio_checks.py measures it).

  pitch_class_profile(audio, sr)    12-bin profile from a harmonic-sum pitch salience (0 = C)
  estimate_pitch_class(audio, sr)   -> (class 0..11, confidence)
  estimate_chord_quality(audio, sr) -> (quality, root, score): triad templates on that profile
  estimate_tempo(audio, sr)         -> BPM from the autocorrelation of an onset-strength envelope
  tempo_matches(estimate, truth)    within a tolerance, octave errors (x2, x1/2) accepted
  estimate_interval(audio, sr)      -> (semitones 1..12, lower MIDI pitch, score): two-pitch detection
  estimate_scale(audio, sr)         -> (mode, tonic class, score): per-segment notes vs mode templates
  estimate_meter(audio, sr)         -> (pulses per bar, pulse period s, score): accent periodicity
  estimate_progression(audio, sr)   -> (progression label, key class, score): per-segment triads

  fft_chroma(x, sr)                 raw FFT energy folded onto pitch classes (no harmonic model)
  beat_period(x, sr)                seconds between clicks from the log-energy rise

Pitch convention: equal temperament, A4 = 440 Hz, MIDI note 69; pitch class = MIDI note mod 12
(0 = C, 1 = C#, ..., 11 = B), the order of `musicrfm.probes.syntheory.PITCH_NAMES`.
"""

from __future__ import annotations

import numpy as np

from musicrfm.probes.syntheory import MODES, PROGRESSIONS, SCALE_MODES, _progression_label, _triad

__all__ = [
    "CHORD_QUALITIES",
    "CHORD_TEMPLATES",
    "METER_PULSES",
    "beat_period",
    "estimate_chord_quality",
    "triad_of_profile",
    "dominant_of_profile",
    "estimate_interval",
    "estimate_meter",
    "estimate_pitch_class",
    "estimate_progression",
    "estimate_scale",
    "estimate_tempo",
    "fft_chroma",
    "mono_signal",
    "onset_strength",
    "pitch_class_profile",
    "pitch_salience",
    "same_progression",
    "tempo_matches",
]

A4_HZ = 440.0

# The triad qualities SynTheory's `chords` concept uses (probes.syntheory.CHORD_TYPES), as pitch
# classes above the root. The augmented triad is symmetric: its three rotations are the same set,
# so its root is ambiguous by construction (see estimate_chord_quality).
CHORD_TEMPLATES: dict[str, tuple[int, int, int]] = {
    "major": (0, 4, 7),
    "minor": (0, 3, 7),
    "aug": (0, 4, 8),
    "dim": (0, 3, 6),
}
CHORD_QUALITIES: tuple[str, ...] = tuple(CHORD_TEMPLATES)


def mono_signal(audio, what: str = "audio", dtype=np.float64) -> np.ndarray:
    """`audio` as a non-empty, finite 1-D array of `dtype`; ValueError naming `what` otherwise."""
    x = np.asarray(audio, dtype=dtype)
    if x.ndim != 1:
        raise ValueError(f"{what} must be a 1-D mono signal, got shape {x.shape}")
    if x.size == 0:
        raise ValueError(f"{what} is empty")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{what} contains NaN or infinite samples")
    return x


def _mono(audio, sr: int, what: str = "audio") -> np.ndarray:
    x = mono_signal(audio, what)
    if not (isinstance(sr, (int, np.integer)) and sr > 0):
        raise ValueError(f"sample rate must be a positive integer, got {sr!r}")
    return x


def _midi_to_hz(midi) -> np.ndarray:
    return A4_HZ * 2.0 ** ((np.asarray(midi, dtype=np.float64) - 69.0) / 12.0)


def _stft_power(x: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    """|STFT|^2 with a Hann window: [frames, n_fft // 2 + 1]. Short signals are zero-padded to
    one frame."""
    if len(x) < n_fft:
        x = np.concatenate([x, np.zeros(n_fft - len(x))])
    frames = np.lib.stride_tricks.sliding_window_view(x, n_fft)[::hop]
    return np.abs(np.fft.rfft(frames * np.hanning(n_fft), axis=1)) ** 2


# --------------------------------------------------------------------------------------------
# Pitch


def pitch_salience(
    audio,
    sr: int,
    *,
    lowest: int = 24,
    highest: int = 107,
    harmonics: int = 8,
    decay: float = 0.8,
    n_fft: int | None = None,
) -> np.ndarray:
    """Harmonic-sum salience of every MIDI pitch `lowest..highest` (default C1-B7): [pitches].

    Method: the clip's long-term magnitude spectrum (Hann STFT, ~1 s frames, power averaged
    over frames, square root) is read at each candidate's harmonics: salience(p) =
    sum_h decay^(h-1) * max |X(f)| over the band f_p * h * 2^(+-1/24) (a semitone wide; where
    that band is narrower than the bins, |X| linearly interpolated at the exact frequency is the
    floor), for h = 1..harmonics below Nyquist. A note's true fundamental collects all
    its partials, so it outscores the candidate sitting on its 3rd harmonic (which collects only
    partials 3, 6, 9, ...): the pitch class of the fundamental wins even when the 3rd harmonic is
    the loudest peak, and a weak or missing fundamental (low piano notes) is restored by its
    overtones.
    """
    x = _mono(audio, sr)
    if n_fft is None:
        n_fft = 1 << round(float(np.log2(sr)))  # ~1 s: 1 Hz bins at 32 kHz
    hop = n_fft // 4
    magnitude = np.sqrt(_stft_power(x, n_fft, hop).mean(axis=0))
    bin_hz = sr / n_fft
    pitches = np.arange(lowest, highest + 1)
    f0 = _midi_to_hz(pitches)
    salience = np.zeros(len(pitches))
    quarter = 2.0 ** (1.0 / 24.0)
    nyquist_bin = len(magnitude) - 1
    for h in range(1, harmonics + 1):
        centre = f0 * h / bin_hz  # in bins
        lo = np.ceil(centre / quarter).astype(int)
        hi = np.floor(centre * quarter).astype(int)
        # exact-frequency reading (linear interpolation) where the band holds no whole bin
        exact = np.interp(centre, np.arange(len(magnitude)), magnitude)
        for i in np.flatnonzero(centre * quarter < nyquist_bin):
            peak = magnitude[lo[i] : hi[i] + 1].max() if hi[i] >= lo[i] else 0.0
            salience[i] += decay ** (h - 1) * max(peak, exact[i])
    return salience


def pitch_class_profile(audio, sr: int, **salience_options) -> np.ndarray:
    """12-bin pitch-class profile (0 = C), summing to 1 (all zeros for a silent clip).

    The harmonic-sum salience of `pitch_salience` folded onto pitch classes (summed over octaves).
    A plain FFT chroma (`fft_chroma`) credits every partial to its own class, so a note's 3rd
    harmonic (a fifth up) and 5th (a major third up) add weight to the wrong classes; the
    harmonic sum moves that weight back to the fundamental's class.

    Limits: equal temperament at A4 = 440 Hz (a detuned source drifts toward a neighbouring class
    beyond a quarter tone); the profile covers the whole clip (no segmentation: a melody's classes
    are summed); inharmonic and noisy sources (drums, bells) give a flat, meaningless profile;
    pitches below C1 (32.7 Hz) and above B7 are not candidates (their octave-shifted classes may
    still appear through harmonics).
    """
    salience = pitch_salience(audio, sr, **salience_options)
    lowest = salience_options.get("lowest", 24)
    classes = (np.arange(len(salience)) + lowest) % 12
    profile = np.bincount(classes, weights=salience, minlength=12)
    total = profile.sum()
    return profile / total if total > 0 else profile


def estimate_pitch_class(audio, sr: int) -> tuple[int, float]:
    """The clip's dominant pitch class -> (class 0..11 with 0 = C, confidence).

    Method: argmax of `pitch_class_profile`. Confidence is the winning class's share of the
    profile (1/12 ~ 0.083 for a flat profile, 1.0 if all salience is in one class); a silent clip
    gives (0, 0.0). Meant for clips built around one pitch class (a held or repeated note, a
    drone); for a melody it returns the most salient class, not "the" note.
    """
    return dominant_of_profile(pitch_class_profile(audio, sr))


def dominant_of_profile(profile: np.ndarray) -> tuple[int, float]:
    """`estimate_pitch_class` of a profile already computed."""
    if not profile.any():
        return 0, 0.0
    best = int(np.argmax(profile))
    return best, float(profile[best])


# --------------------------------------------------------------------------------------------
# Chords


def estimate_chord_quality(audio, sr: int) -> tuple[str, int, float]:
    """Triad quality by template matching -> (quality, root pitch class, score).

    Method: the clip's `pitch_class_profile` is compared with the 48 binary triad templates (the
    qualities of SynTheory's chords: major 0-4-7, minor 0-3-7, aug 0-4-8, dim 0-3-6, on each of
    the 12 roots) by cosine similarity; the best (quality, root) and its cosine are returned
    (1.0 = the profile is exactly the three classes, equally weighted).

    Limits: one chord per clip (no segmentation: a progression gives a blend); triads only
    (sevenths and suspensions are forced onto the nearest triad); the augmented triad is
    symmetric, so its three rotations score the same and the root returned is the lowest pitch
    class among them (judge aug roots modulo 4); a missing or weak chord tone can turn dim into
    minor or aug into major.
    """
    return triad_of_profile(pitch_class_profile(audio, sr))


def triad_of_profile(profile: np.ndarray) -> tuple[str, int, float]:
    """`estimate_chord_quality` of a profile already computed."""
    if not profile.any():
        return CHORD_QUALITIES[0], 0, 0.0
    unit = profile / np.linalg.norm(profile)
    best = (CHORD_QUALITIES[0], 0, -np.inf)
    for quality, intervals in CHORD_TEMPLATES.items():
        for root in range(12):
            score = sum(unit[(root + i) % 12] for i in intervals) / np.sqrt(3.0)
            if score > best[2] + 1e-12:
                best = (quality, root, float(score))
    return best


# --------------------------------------------------------------------------------------------
# Tempo


def onset_strength(audio, sr: int, *, hop_seconds: float = 0.005, bands: int = 40) -> tuple[np.ndarray, float]:
    """Onset-strength envelope -> (envelope [frames], frame rate in Hz).

    Spectral flux on a log-compressed band spectrum: |STFT|^2 (~32 ms Hann frames, `hop_seconds`
    hop) pooled into `bands` log-spaced bands between 40 Hz and min(8 kHz, Nyquist), log(1 + 1000 x)
    compressed, the positive frame-to-frame rise summed over bands, then the slow trend (a 1 s
    moving average) removed and negative values set to 0.
    """
    x = _mono(audio, sr)
    hop = max(1, round(sr * hop_seconds))
    n_fft = 1 << int(np.ceil(np.log2(sr * 0.032)))
    power = _stft_power(x, n_fft, hop)
    freqs = np.fft.rfftfreq(n_fft, 1.0 / sr)
    edges = np.geomspace(40.0, min(8000.0, sr / 2.0), bands + 1)
    band = np.searchsorted(edges, freqs, side="right") - 1
    keep = np.flatnonzero((band >= 0) & (band < bands))
    pooling = np.zeros((len(freqs), bands))
    pooling[keep, band[keep]] = 1.0
    pooled = power @ pooling
    peak = pooled.max()
    if peak > 0:
        pooled /= peak
    logged = np.log1p(1000.0 * pooled)
    flux = np.maximum(np.diff(logged, axis=0), 0.0).sum(axis=1)
    rate = sr / hop
    width = max(1, round(rate))
    if len(flux) > width:
        trend = np.convolve(flux, np.ones(width) / width, mode="same")
        flux = np.maximum(flux - trend, 0.0)
    return flux, rate


def estimate_tempo(
    audio,
    sr: int,
    *,
    min_bpm: float = 30.0,
    max_bpm: float = 300.0,
    prior_bpm: float = 120.0,
    prior_octaves: float = 1.0,
) -> float:
    """Tempo in BPM from the autocorrelation of the onset-strength envelope.

    Method (the core of classic beat trackers): `onset_strength` -> autocorrelation (normalised
    by the overlap at each lag, so long lags in a short clip are not penalised) -> the lag range
    of `min_bpm..max_bpm` weighted by a log-normal prior on tempo (centre `prior_bpm`, standard
    deviation `prior_octaves` octaves, as librosa's default) -> the strongest lag, refined to a
    fraction of a frame by a parabola through its neighbours -> 60 / lag.

    Limits: one global tempo per clip (no tempo changes); octave errors are inherent (a
    pulse at 60 BPM also repeats at 30, and its bars and off-beats can win), so compare with
    `tempo_matches`, which accepts x2 and x1/2; a 4 s clip holds only ~3 beats at 50 BPM, so slow
    tempi rest on few repetitions, and beat periods longer than half the clip are not considered
    (a 4 s clip reaches down to 30 BPM); a clip with no onsets at all (silence, a steady tone)
    gives NaN, and an unpulsed clip (noise, a drone with vibrato) gives a number that means
    nothing.
    """
    envelope, rate = onset_strength(audio, sr)
    n = len(envelope)
    lo = max(1, int(np.floor(rate * 60.0 / max_bpm)))
    hi = min(n // 2, int(np.ceil(rate * 60.0 / min_bpm)))  # lags with at least half the clip overlapping
    if hi <= lo + 1:
        raise ValueError(f"clip too short to estimate a tempo: {len(envelope) / rate:.2f} s")
    if envelope.max(initial=0.0) < 0.01:
        # no onsets (silence, a steady tone): a real onset rises by ~1 or more on this scale
        return float("nan")
    centred = envelope - envelope.mean()
    size = 1 << int(np.ceil(np.log2(2 * n)))
    spectrum = np.fft.rfft(centred, size)
    ac = np.fft.irfft(np.abs(spectrum) ** 2, size)[:n]
    ac = ac / (n - np.arange(n))  # unbiased: mean product at each lag
    lags = np.arange(lo, hi + 1)
    bpm = 60.0 * rate / lags
    prior = np.exp(-0.5 * (np.log2(bpm / prior_bpm) / prior_octaves) ** 2)
    weighted = np.maximum(ac[lags], 0.0) * prior
    k = int(np.argmax(weighted))
    lag = float(lags[k])
    if 0 < k < len(lags) - 1:
        a, b, c = ac[lags[k] - 1], ac[lags[k]], ac[lags[k] + 1]
        denom = a - 2 * b + c
        if denom < 0:
            lag += float(np.clip(0.5 * (a - c) / denom, -0.5, 0.5))
    return 60.0 * rate / lag


def tempo_matches(estimate: float, truth: float, tol: float = 0.04) -> bool:
    """True if `estimate` is within `tol` (relative) of `truth`, of twice it or of half it.

    Octave errors are accepted because a pulse at T BPM is also a pulse at 2T (every other beat
    between) and T/2 (every other beat heard): the standard "Accuracy 2" of MIREX tempo
    evaluation, restricted to factors 2 and 1/2 (not 3 or 1/3).
    """
    if not (truth > 0 and np.isfinite(truth)):
        raise ValueError(f"truth must be a positive tempo, got {truth!r}")
    if not np.isfinite(estimate):
        return False
    return any(abs(estimate - truth * f) <= tol * truth * f for f in (1.0, 2.0, 0.5))


# --------------------------------------------------------------------------------------------
# Segments: the pieces of a clip the interval, scale and progression checks read one by one


def _segments(x: np.ndarray, sr: int, seconds: float) -> list[np.ndarray]:
    """Consecutive `seconds`-long pieces of `x`; a tail shorter than half a piece is dropped (a clip shorter
    than one piece is one piece)."""
    if not seconds > 0:
        raise ValueError(f"segment length must be > 0 seconds, got {seconds!r}")
    size = max(1, round(seconds * sr))
    pieces = [x[i : i + size] for i in range(0, len(x), size)]
    if len(pieces) > 1 and len(pieces[-1]) < size / 2:
        pieces.pop()
    return pieces


def _voiced(pieces: list[np.ndarray], floor: float = 0.05) -> list[np.ndarray]:
    """The pieces whose RMS is at least `floor` x the loudest piece's (silence and release tails out)."""
    rms = np.array([np.sqrt(np.mean(np.square(p))) for p in pieces])
    if not rms.any():
        return []
    return [p for p, r in zip(pieces, rms) if r >= floor * rms.max()]


def _salience_fft(sr: int, seconds: float) -> int:
    """The FFT size pitch_salience uses on a `seconds`-long piece: the power of two nearest its length (at
    least 4,096 samples; a 0.5 s piece at 32 kHz reads 2 Hz bins, under a quarter tone from C2 up)."""
    return max(4096, 1 << round(float(np.log2(max(1.0, seconds * sr)))))


# --------------------------------------------------------------------------------------------
# Intervals

# Offsets (semitones) at which a note's own partials 2, 3, 4, 5, 6, 8 sit (and, negated, the notes whose
# partials it is): a second pitch found there may be the first note's overtone, so it is not a candidate.
_PARTIAL_OFFSETS = (12, 19, 24, 28, 31, 36)


def _sounding_salience(x: np.ndarray, sr: int, lowest: int, n_fft: int, floor: float = 0.1) -> np.ndarray:
    """`pitch_salience`, zero for the pitches whose own fundamental is weaker than `floor` x the strongest
    fundamental. Two notes a fifth apart are the 2nd and 3rd partials of a note an octave below the lower
    one, which the harmonic sum rewards; that phantom has no fundamental of its own."""
    salience = pitch_salience(x, sr, lowest=lowest, n_fft=n_fft)
    fundamental = pitch_salience(x, sr, lowest=lowest, n_fft=n_fft, harmonics=1)
    return np.where(fundamental >= floor * fundamental.max(initial=0.0), salience, 0.0)


def estimate_interval(audio, sr: int, *, segment_seconds: float = 0.5) -> tuple[int, int, float]:
    """The interval between the clip's two pitches -> (semitones 1..12, lower MIDI pitch, score).

    SynTheory's `intervals` label is the size in semitones, 1 (m2) to 12 (P8), played melodically (the
    two notes alternating, one beat each) or harmonically (both at once). Method: the clip is cut into
    `segment_seconds` pieces (one beat at SynTheory's 120 BPM); each voiced piece votes for its most
    salient MIDI pitch (`pitch_salience`, among the pitches whose fundamental sounds: see
    `_sounding_salience`). Melodic: when a second pitch wins at least a quarter of the pieces, the
    interval is between the two most voted pitches. Harmonic: otherwise the second pitch is the most
    salient one within an octave of the first, summed over the pieces, leaving out the first note's own
    partials (an octave, a twelfth, ...) and the notes whose partials it is; when no other pitch sounds
    there, the interval is the octave. Score: the second pitch's share of the two (its votes, or its
    salience for a harmonic interval). A distance over an octave is folded into 1..12 (a tenth reads as
    a third).

    Limits: two pitches only (a chord gives its two most salient notes); a harmonic octave (12) is one
    note with strong even partials as far as the spectrum goes, so a lone held note also reads as an
    octave, and a harmonic octave over a little noise as whatever else sounds most; a pitch read an
    octave off in some pieces makes a false melodic octave; a source with a weak fundamental (a low
    piano note) is read at a partial instead; a silent clip gives (12, 0, 0.0).
    """
    x = _mono(audio, sr)
    pieces = _voiced(_segments(x, sr, segment_seconds))
    if not pieces:
        return 12, 0, 0.0
    lowest = 24
    n_fft = _salience_fft(sr, segment_seconds)
    saliences = np.array([_sounding_salience(p, sr, lowest, n_fft) for p in pieces])
    votes = np.bincount(saliences.argmax(axis=1), minlength=saliences.shape[1])
    first, second = np.argsort(votes, kind="stable")[::-1][:2]
    if votes[second] >= 0.25 * len(pieces):
        score = votes[second] / (votes[first] + votes[second])
    else:
        total = saliences.sum(axis=0)
        candidates = np.full(len(total), -np.inf)
        near = np.arange(max(0, first - 12), min(len(total), first + 13))
        candidates[near] = total[near]
        for offset in (0, *_PARTIAL_OFFSETS, *(-o for o in _PARTIAL_OFFSETS)):
            if 0 <= first + offset < len(total):
                candidates[first + offset] = -np.inf
        second = int(np.argmax(candidates))
        if not candidates[second] > 0 and first + 12 < len(total):
            # nothing else sounds within an octave: the one sound left is the first note's octave (a harmonic
            # octave, or a lone note: the two are one spectrum)
            second = first + 12
        score = total[second] / (total[first] + total[second]) if total[first] + total[second] > 0 else 0.0
    distance = abs(int(first) - int(second))
    semitones = (distance - 1) % 12 + 1
    return semitones, lowest + min(int(first), int(second)), float(score)


# --------------------------------------------------------------------------------------------
# Scales

# SynTheory's scale concept plays a mode from tonic to octave: the tonic's class sounds twice, every other
# class of the mode once. The templates weigh it so; since the seven modes share one pitch-class set up to
# transposition, that doubled tonic is what tells them apart.
_TONIC_WEIGHT = 2.0


def estimate_scale(audio, sr: int, *, segment_seconds: float = 0.5,
                   modes: tuple[str, ...] = SCALE_MODES) -> tuple[str, int, float]:
    """The clip's mode -> (mode, tonic pitch class, score).

    Method: the clip is cut into `segment_seconds` pieces (one note at SynTheory's 120 BPM); each voiced
    piece votes for its dominant pitch class (`pitch_class_profile`); the 12-bin vote histogram is compared
    by cosine with every mode of `modes` (their steps from probes.syntheory.MODES) on every tonic, the
    tonic's class weighted x2 and the other six classes x1; the best (mode, tonic) and its cosine are
    returned.

    Limits: the seven diatonic modes are one pitch-class set transposed, so the mode rests on which class
    is the tonic, read here as the class heard most often: true of a scale played tonic to octave, of a
    drone, often of a melody ending on its tonic, not of music in general; one note per piece (faster
    notes blend into a piece's profile, and only its dominant class votes); a silent clip gives
    (modes[0], 0, 0.0).
    """
    x = _mono(audio, sr)
    unknown = [m for m in modes if m not in MODES]
    if not modes or unknown:
        raise ValueError(f"unknown modes {unknown}; expected names from {', '.join(MODES)}")
    pieces = _voiced(_segments(x, sr, segment_seconds))
    if not pieces:
        return modes[0], 0, 0.0
    n_fft = _salience_fft(sr, segment_seconds)
    classes = [int(np.argmax(pitch_class_profile(p, sr, n_fft=n_fft))) for p in pieces]
    counts = np.bincount(classes, minlength=12).astype(np.float64)
    unit = counts / np.linalg.norm(counts)
    best = (modes[0], 0, -np.inf)
    for mode in modes:
        template = np.zeros(12)
        template[list(MODES[mode])] = 1.0
        template[0] = _TONIC_WEIGHT
        template /= np.linalg.norm(template)
        for tonic in range(12):
            score = float(unit @ np.roll(template, tonic))
            if score > best[2] + 1e-12:
                best = (mode, tonic, score)
    return best


# --------------------------------------------------------------------------------------------
# Meter

# Pulses per bar the meter check considers: SynTheory's time signatures click once per beat in simple
# meters (2/2, 2/4, 3/4, 4/4) and once per eighth in compound ones (3/8, 6/8, 9/8, 12/8), so its bars hold
# 2, 3, 4, 6, 9 or 12 clicks (the signature's numerator).
METER_PULSES: tuple[int, ...] = (2, 3, 4, 6, 9, 12)


def _onset_peaks(envelope: np.ndarray, rate: float, min_gap_seconds: float = 0.1,
                 floor: float = 0.2) -> np.ndarray:
    """Frame indices of the onset envelope's peaks: local maxima above `floor` x its maximum, at least
    `min_gap_seconds` apart (the stronger kept)."""
    if envelope.max(initial=0.0) <= 0:
        return np.zeros(0, dtype=int)
    above = envelope >= floor * envelope.max()
    local = np.r_[False, (envelope[1:-1] >= envelope[:-2]) & (envelope[1:-1] > envelope[2:]), False]
    gap = max(1, round(min_gap_seconds * rate))
    kept: list[int] = []
    for i in sorted(np.flatnonzero(above & local), key=lambda i: -envelope[i]):
        if all(abs(i - k) >= gap for k in kept):
            kept.append(int(i))
    return np.array(sorted(kept), dtype=int)


def _pulse_period(envelope: np.ndarray, rate: float, shortest: float = 0.2, longest: float = 1.5) -> float:
    """Seconds between pulses: the shortest strong peak (>= 0.4 x the highest) of the onset envelope's
    autocorrelation between `shortest` and `longest` seconds (as `beat_period`: the accented bar correlates
    too, and more strongly, hence the shortest); nan for a clip too short or without onsets."""
    n = len(envelope)
    lo, hi = max(1, round(shortest * rate)), min(n - 1, round(longest * rate))
    if hi <= lo + 2 or envelope.max(initial=0.0) <= 0:
        return float("nan")
    centred = envelope - envelope.mean()
    ac = np.correlate(centred, centred, mode="full")[n - 1 :] / (n - np.arange(n))
    seg = ac[lo : hi + 1]
    peaks = [i for i in range(1, len(seg) - 1) if seg[i] >= max(seg[i - 1], seg[i + 1]) and seg[i] > 0]
    if not peaks:
        return float("nan")
    top = max(seg[i] for i in peaks)
    return (lo + next(i for i in peaks if seg[i] >= 0.4 * top)) / rate


def estimate_meter(audio, sr: int, *, pulses: tuple[int, ...] = METER_PULSES,
                   accent_seconds: float = 0.04) -> tuple[int, float, float]:
    """Pulses per bar from accent periodicity -> (pulses per bar, pulse period in seconds, score).

    Method: the pulse period is the shortest strong periodicity of `onset_strength` (0.2-1.5 s); onsets
    are its peaks, one per pulse at most; each onset gets a pulse index (its time over the period, from
    the first onset) and an accent, the energy in dB of the `accent_seconds` after it (a downbeat is
    louder, or another sound). For each candidate bar length k in `pulses`, the accents are grouped by
    pulse index mod k; the bar's downbeat is the group with the highest mean, and the contrast is that
    mean minus the mean of the other onsets. The k with the highest contrast wins (ties: the shorter
    bar); the score is that contrast in dB (0: no accent; SynTheory's downbeats, velocity 100 against 75
    and another sound, stand out by several dB). Multiples of the true bar lose because their other
    groups hold downbeats too; divisors lose because their downbeat group holds unaccented pulses.

    Limits: made for click tracks and clearly accented pulses (SynTheory's metronome): a steady pulse
    with no accent gives a meaningless k (score ~0 dB), and so does music whose onsets are not one
    regular pulse (syncopation, rubato); a 4 s clip holds few bars of a long meter (12 eighths at 120
    BPM = 1.5 s), so long bars rest on one or two downbeats; pulses faster than 0.2 s (eighths above
    150 BPM) are read as pairs; k must be seen at least once whole (a bar longer than the clip's onsets
    is not considered); a clip with fewer than three onsets gives (pulses[0], nan, 0.0).
    """
    x = _mono(audio, sr)
    if not pulses or any(int(k) < 2 for k in pulses):
        raise ValueError(f"pulses per bar must be integers >= 2, got {pulses!r}")
    envelope, rate = onset_strength(x, sr)
    pulse = _pulse_period(envelope, rate)
    # one onset per pulse: a click's second transient (a drum's rebound, ~0.1 s on) is not a pulse of its own
    peaks = _onset_peaks(envelope, rate, min_gap_seconds=0.6 * pulse) if np.isfinite(pulse) else []
    if len(peaks) < 3:
        return int(pulses[0]), float("nan"), 0.0
    gaps = np.diff(peaks) / rate
    period = float(np.median(gaps / np.maximum(1, np.round(gaps / pulse))))  # a missing onset is two gaps
    index = np.round((peaks - peaks[0]) / rate / period).astype(int)
    # the envelope's frame i is the rise from STFT frame i to i + 1: the onset's sound starts about there
    hop = sr / rate
    width = max(1, round(accent_seconds * sr))
    accents = np.array([10.0 * np.log10(np.mean(np.square(x[int(p * hop) : int(p * hop) + width])) + 1e-12)
                        for p in peaks])  # dB
    best = (int(pulses[0]), -np.inf)
    for k in sorted(int(k) for k in pulses):
        if index[-1] + 1 < k:
            continue
        phase = index % k
        means = [accents[phase == f].mean() for f in range(k) if np.any(phase == f)]
        downbeat = int(np.argmax(means))
        group = [f for f in range(k) if np.any(phase == f)][downbeat]
        rest = accents[phase != group]
        contrast = means[downbeat] - (rest.mean() if rest.size else means[downbeat])
        if contrast > best[1] + 1e-9:
            best = (k, float(contrast))
    return best[0], period, float(max(best[1], 0.0)) if np.isfinite(best[1]) else 0.0


# --------------------------------------------------------------------------------------------
# Chord progressions


def _progression_templates() -> dict[str, np.ndarray]:
    """SynTheory's progression label -> its four chords in C as unit pitch-class vectors [4, 12] (each
    triad's three classes), built from probes.syntheory's own voicing (`_triad`)."""
    out = {}
    for mode, degrees in PROGRESSIONS:
        chords = np.zeros((len(degrees), 12))
        for i, degree in enumerate(degrees):
            chords[i, [n % 12 for n in _triad(0, mode, degree)]] = 1.0 / np.sqrt(3.0)
        out[_progression_label(mode, degrees)] = chords
    return out


def estimate_progression(audio, sr: int, *, chord_seconds: float | None = None) -> tuple[str, int, float]:
    """The clip's chord progression -> (SynTheory progression label, key pitch class, score).

    Method: the clip is cut into one segment per chord (`chord_seconds` each; by default the clip in four
    equal parts, SynTheory's four chords of 1 s); each segment's `pitch_class_profile` (unit length) is
    compared by cosine with the chord of every progression of probes.syntheory.PROGRESSIONS (19: 10 major,
    9 minor) in every key, the cosines averaged over the segments; the best (label, key) and its mean
    cosine are returned. Labels are key-free, as SynTheory's are.

    Limits: "ionian-(6, 4, 1, 5)" and "aeolian-(1, 6, 3, 7)" are the same four chords (a major key and its
    relative minor: Am F C G in C), so they cannot be told apart by ear and tie; the first in
    PROGRESSIONS' order (the ionian one) is returned; a progression of other length, or chords that do not
    line up with the segments, blends chords; triads only, as `estimate_chord_quality`.
    """
    x = _mono(audio, sr)
    templates = _progression_templates()
    count = len(next(iter(templates.values())))
    seconds = chord_seconds if chord_seconds is not None else len(x) / sr / count
    pieces = _segments(x, sr, seconds)[:count]
    if len(pieces) < count:
        raise ValueError(f"clip too short for {count} chords of {seconds:.2f} s: {len(x) / sr:.2f} s")
    n_fft = _salience_fft(sr, seconds)
    profiles = np.array([pitch_class_profile(p, sr, n_fft=n_fft) for p in pieces])
    norms = np.linalg.norm(profiles, axis=1, keepdims=True)
    if not norms.any():
        return next(iter(templates)), 0, 0.0
    unit = np.divide(profiles, norms, out=np.zeros_like(profiles), where=norms > 0)
    best = (next(iter(templates)), 0, -np.inf)
    for label, chords in templates.items():
        for key in range(12):
            score = float(np.mean(np.sum(unit * np.roll(chords, key, axis=1), axis=1)))
            if score > best[2] + 1e-12:
                best = (label, key, score)
    return best


def same_progression(a: str, b: str) -> bool:
    """True if progression labels `a` and `b` are the same four chords in some keys (equal labels, or a
    major-key progression and its relative-minor twin, which `estimate_progression` cannot tell apart)."""
    templates = _progression_templates()
    for label in (a, b):
        if label not in templates:
            raise ValueError(f"unknown progression {label!r}; expected a SynTheory label "
                             f"such as {next(iter(templates))!r}")
    return a == b or any(np.allclose(templates[a], np.roll(templates[b], key, axis=1)) for key in range(12))


# --------------------------------------------------------------------------------------------
# Raw helpers (also used by tests/probes/test_syntheory.py to check renders)


def fft_chroma(x: np.ndarray, sr: int = 32_000) -> np.ndarray:
    """Spectral energy folded onto the 12 pitch classes (50 Hz-5 kHz): [12], unnormalised.

    One Hann-windowed FFT of the whole signal; every bin's power goes to the class of its nearest
    equal-tempered pitch. No harmonic model: a note's partials count toward their own classes
    (the 3rd harmonic toward the fifth), so use `pitch_class_profile` to name a note's class
    when the timbre is rich; this is the rawest possible check that a render has energy at the
    pitch it should.
    """
    x = np.asarray(x)
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x)))) ** 2
    freqs = np.fft.rfftfreq(len(x), 1.0 / sr)
    keep = (freqs >= 50.0) & (freqs <= 5000.0)
    pitch_class = np.round(12 * np.log2(freqs[keep] / A4_HZ) + 69).astype(int) % 12
    return np.bincount(pitch_class, weights=spectrum[keep], minlength=12)


def beat_period(x: np.ndarray, sr: int = 32_000, hop: int = 160) -> float:
    """Seconds between clicks: the shortest strong peak (>= 0.7 x the highest) of the
    autocorrelation of the log-energy rise, within 0.2-1.5 s.

    Made for isolated clicks (SynTheory's metronome tracks): multiples of the beat correlate too,
    and the accented downbeat favours the bar, hence the shortest strong peak. Resolution is one
    hop (5 ms at 32 kHz with the default); for music, use `estimate_tempo`.
    """
    x = np.asarray(x)
    frames = len(x) // hop
    energy = np.square(x[: frames * hop].reshape(frames, hop)).sum(axis=1)
    rise = np.maximum(np.diff(np.log(energy + 1e-6)), 0.0)
    rise -= rise.mean()
    ac = np.correlate(rise, rise, mode="full")[len(rise) - 1 :]
    lo, hi = int(0.2 * sr / hop), int(1.5 * sr / hop)
    seg = ac[lo:hi]
    strong = [i for i in range(1, len(seg) - 1)
              if seg[i] >= max(seg[i - 1], seg[i + 1]) and seg[i] >= 0.7 * seg.max()]  # fmt: skip
    return (lo + strong[0]) * hop / sr
