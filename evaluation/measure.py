"""Per-clip measurements of generated audio: independent checks, multiclass probe read-outs, traces over time.

  check_name(concept)                     the independent check a concept has (None: none)
  check_clip(concept, cls, audio, sr)     {"pred", "correct", "score"} for a concept with a check (CHECKS),
                                          tempo: {"pred", "bpm"} and correct None; else None
  window_bounds(n, sr, window, hop)       [(start, stop)] sample ranges of sliding windows
  check_trace(concept, cls, audio, sr, wins)   pitch-class share of `cls` per window (notes only)
  fit_probe(feature_dir, ...)             the multiclass RFM probe at the best layer (paper Sec. 5.2), fitted
                                          on the same seeded split as `musicrfm train` / `report`
  FittedProbe.proba(model, clips)         softmax over the probe's classes of features re-extracted from audio
  fit_regressor(feature_dir, ...)         a regression concept's (tempo's) RFM regressor at the best layer
  FittedRegressor.predict(model, clips)   its reading (BPM) of features re-extracted from audio

The probe reads MusicGen features of the generated audio the way `musicrfm extract` reads training clips
(probes.extract.encode_audio + decoder_features: EnCodec codes -> BOS + delay pattern -> the residual stream,
mean-pooled), with the prompt the training features were extracted with (empty by default).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .audio_checks import (
    METER_PULSES,
    dominant_of_profile,
    estimate_chord_quality,
    estimate_interval,
    estimate_meter,
    estimate_pitch_class,
    estimate_progression,
    estimate_scale,
    estimate_tempo,
    pitch_class_profile,
    same_progression,
    triad_of_profile,
)
from musicrfm.probes.syntheory import PITCH_NAMES, PROGRESSIONS, SCALE_MODES, TIME_SIGNATURES, _progression_label

__all__ = [
    "CHECKS",
    "FittedProbe",
    "FittedRegressor",
    "check_clip",
    "check_name",
    "check_trace",
    "chord_measures",
    "classifier_to_cpu",
    "fit_probe",
    "fit_regressor",
    "segment",
    "window_bounds",
]

def _named(what: str, check) -> str:
    """"pitch class (musicrfm.evaluation.audio_checks.estimate_pitch_class)": the outputs name the function."""
    return f"{what} ({check.__module__}.{check.__qualname__})"


# concept -> the independent check (signal processing only, no MusicGen, no probe) that judges it
CHECKS = {
    "notes": _named("pitch class", estimate_pitch_class),
    "chords": _named("chord quality", estimate_chord_quality),
    "quality": _named("chord quality", estimate_chord_quality),  # the quality controls (engine.steering)
    "intervals": _named("interval size", estimate_interval),
    "scales": _named("scale mode", estimate_scale),
    "time_signatures": _named("pulses per bar", estimate_meter),
    "chord_progressions": _named("chord progression", estimate_progression),
    "tempos": _named("tempo in BPM", estimate_tempo),
}

# The class names each check can judge: SynTheory's labels (probes.dataset.LABEL_COLUMNS' text)
INTERVAL_CLASSES = tuple(str(size) for size in range(1, 13))
PROGRESSION_CLASSES = tuple(_progression_label(mode, degrees) for mode, degrees in PROGRESSIONS)
# "(3, 4)" -> 3: a time signature's clicks per bar (its numerator; SynTheory clicks eighths in compound meters)
SIGNATURE_PULSES = {str(signature): signature[0] for signature in TIME_SIGNATURES}


def check_name(concept: str) -> str | None:
    return CHECKS.get(concept)


def segment(audio: np.ndarray, window: Sequence[float]) -> np.ndarray:
    """The part of a clip between fractions window = (a, b) of its length (at least one sample)."""
    a, b = float(window[0]), float(window[1])
    if not 0.0 <= a < b <= 1.0:
        raise ValueError(f"a window is (start, end) fractions with 0 <= start < end <= 1, got {window!r}")
    n = len(audio)
    start = min(round(a * n), n - 1)
    return audio[start:max(start + 1, round(b * n))]


def check_clip(concept: str, cls: str, audio: np.ndarray, sr: int) -> dict | None:
    """Does the clip sound like class `cls` of `concept`? None when the concept has no check (or the class
    is not one the check knows)."""
    if concept == "notes" and cls in PITCH_NAMES:
        pc, confidence = estimate_pitch_class(audio, sr)
        return {"pred": PITCH_NAMES[pc], "correct": PITCH_NAMES[pc] == cls, "score": float(confidence)}
    if concept in ("chords", "quality") and cls in ("major", "minor", "aug", "dim"):
        quality, _root, score = estimate_chord_quality(audio, sr)
        return {"pred": quality, "correct": quality == cls, "score": float(score)}
    if concept == "intervals" and cls in INTERVAL_CLASSES:
        semitones, _lower, score = estimate_interval(audio, sr)
        return {"pred": str(semitones), "correct": str(semitones) == cls, "score": score}
    if concept == "scales" and cls in SCALE_MODES:
        mode, _tonic, score = estimate_scale(audio, sr)
        return {"pred": mode, "correct": mode == cls, "score": score}
    if concept == "time_signatures" and SIGNATURE_PULSES.get(cls) in METER_PULSES:
        # judged by clicks per bar: the signature's unit needs the tempo, which steering may move too
        pulses, _period, score = estimate_meter(audio, sr)
        return {"pred": f"{pulses} per bar", "correct": pulses == SIGNATURE_PULSES[cls], "score": score}
    if concept == "chord_progressions" and cls in PROGRESSION_CLASSES:
        label, _key, score = estimate_progression(audio, sr)
        # a relative-key twin (same four chords) counts: the two cannot differ by ear
        return {"pred": label, "correct": same_progression(label, cls), "score": score}
    if concept == "tempos":
        # a regression: no class to be right about; the BPM is what the sweep reports (shift vs the reference)
        try:
            bpm = estimate_tempo(audio, sr)
        except ValueError as error:  # a clip (or crossfade window) too short to hold a beat: no reading, no crash
            return {"pred": f"no tempo: {error}", "correct": None, "score": None, "bpm": float("nan")}
        return {"pred": f"{bpm:.1f} BPM", "correct": None, "score": None, "bpm": float(bpm)}
    return None


def chord_measures(audio: np.ndarray, sr: int, root: int | None = None) -> dict:
    """What chord a clip holds, relative to a root: the pitch-class profile, the triad-template match
    (quality, its root, cosine), the dominant pitch class, and the third's contrast at `root` (the steered
    root; None: the template's root): profile[root + 4] - profile[root + 3], > 0 leans major, < 0 minor."""
    profile = pitch_class_profile(audio, sr)  # once: the template match and the dominant class read it
    quality, template_root, score = triad_of_profile(profile)
    dominant, _ = dominant_of_profile(profile)
    at = template_root if root is None else int(root)
    return {"profile": [round(float(v), 6) for v in profile], "template": quality, "template_root": int(template_root),
            "template_score": float(score), "dominant": int(dominant), "steered_root": root,
            "third_contrast": float(profile[(at + 4) % 12] - profile[(at + 3) % 12])}


def window_bounds(n_samples: int, sr: int, window: float, hop: float) -> list[tuple[int, int]]:
    """Sliding windows of `window` seconds every `hop` seconds that fit in the clip (one shorter window
    covering the whole clip if the clip is shorter than a window)."""
    if not (window > 0 and hop > 0):
        raise ValueError(f"window and hop must be > 0 seconds, got {window} and {hop}")
    w, h = max(1, round(window * sr)), max(1, round(hop * sr))
    if n_samples <= w:
        return [(0, n_samples)]
    return [(s, s + w) for s in range(0, n_samples - w + 1, h)]


def check_trace(concept: str, cls: str, audio: np.ndarray, sr: int,
                bounds: Sequence[tuple[int, int]]) -> list[float] | None:
    """Per window, the share of the clip's pitch-class profile that falls on `cls` (notes only): the
    independent counterpart of the probe's softmax trace. 1/12 ~ 0.083 is a flat profile."""
    if concept != "notes" or cls not in PITCH_NAMES:
        return None
    pc = PITCH_NAMES.index(cls)
    return [float(pitch_class_profile(audio[a:b], sr)[pc]) for a, b in bounds]


# --------------------------------------------------------------------------------------------
# The multiclass probe


def classifier_to_cpu(clf):
    """A probes.rfm.Classifier with every tensor on the CPU (to ship to workers, and to predict anywhere)."""
    p = clf.predictor
    fm = p.features
    features = replace(fm, mean=fm.mean.cpu(), basis=None if fm.basis is None else fm.basis.cpu())
    predictor = replace(p, features=features, centers=p.centers.cpu(),
                        metric=None if p.metric is None else p.metric.cpu(), alpha=p.alpha.cpu())
    return replace(clf, predictor=predictor)


@dataclass(frozen=True, eq=False)
class FittedProbe:
    """A multiclass probe at one layer, and how it was chosen."""

    concept: str
    classes: tuple[str, ...]
    layer: int
    prompt: str  # the text conditioning the training features were extracted with
    classifier: object  # probes.rfm.Classifier (CPU tensors)
    val_accuracy: float
    test_accuracy: float
    selection: str  # how the layer was chosen
    site: str = "residual"  # the injection point the training features were read at (re-extracted there)

    def features(self, model, clips: Sequence[np.ndarray]) -> torch.Tensor:
        """Mean-pooled features at `layer` of each clip (at the site the training features were read at),
        re-extracted from the audio: [n, d]."""
        from musicrfm.probes.extract import decoder_features, encode_audio

        audio = [torch.from_numpy(np.ascontiguousarray(c, dtype=np.float32)) for c in clips]
        length = max(a.shape[0] for a in audio)
        padded = torch.stack([torch.nn.functional.pad(a, (0, length - a.shape[0])) for a in audio])
        codes = encode_audio(model, padded)
        frames = torch.tensor([max(1, min(codes.shape[2], a.shape[0] // model.hop_length)) for a in audio])
        return decoder_features(model, codes, self.prompt, [self.layer], frames, site=self.site)["mean"][:, 0]

    def proba(self, model, clips: Sequence[np.ndarray]) -> np.ndarray:
        """Softmax over `classes` [n, C] (float64) of each clip."""
        X = self.features(model, clips)
        return self.classifier.predict_proba(X).double().cpu().numpy()

    def describe(self) -> str:
        return (f"multiclass RFM probe for {self.concept} at layer {self.layer} ({self.selection}; "
                f"validation accuracy {self.val_accuracy:.3f}, test {self.test_accuracy:.3f})")


def _best_layer(feature_dir: Path, head, layer: int | None, cache: str | Path | None, key: dict, fit, score: str,
                what: str, progress: bool):
    """(layer, fit, features [n, d] there, how it was chosen): `fit(X)` at `layer` if given, else at every extracted
    layer, keeping the best `score` (ties: the lower layer, as `musicrfm report`). `cache` (a JSON file, one entry
    per concept) remembers the layer chosen for settings `key`, so a rerun fits one layer, not all."""
    from tqdm import tqdm

    from musicrfm.probes.extract import FeatureError, load_features

    stored = None
    if layer is None and cache is not None and Path(cache).is_file():
        stored = json.loads(Path(cache).read_text()).get(head.concept)
        stored = stored if stored and stored.get("key") == key else None
    if layer is not None:
        if layer not in head.layers:
            raise FeatureError(f"{feature_dir}: layer {layer} was not extracted (have {head.layers})")
        candidates, selection = [layer], "layer given"
    elif stored is not None:
        candidates, selection = [stored["layer"]], f"best validation {what} over layers (cached)"
    else:
        candidates, selection = list(head.layers), f"best validation {what} over layers"
    fs = load_features(feature_dir, head.fingerprint, layers=candidates, poolings=["mean"])
    best = None
    for j, lay in enumerate(tqdm(candidates, desc=f"probe {head.concept}", unit="layer", disable=not progress)):
        X = fs.features["mean"][:, j]
        fitted = fit(X)
        if best is None or getattr(fitted, score) > getattr(best[1], score):
            best = (lay, fitted, X)
    if layer is None and cache is not None and stored is None:
        path = Path(cache)
        data = json.loads(path.read_text()) if path.is_file() else {}
        data[head.concept] = {"key": key, "layer": best[0], score: getattr(best[1], score)}
        path.write_text(json.dumps(data, indent=1) + "\n")
    return (*best, selection)


def fit_probe(feature_dir: str | Path, *, fingerprint=None, seed: int = 0, trials: int | None = None,
              layer: int | None = None, device: str | None = None, cache: str | Path | None = None,
              progress: bool = False) -> FittedProbe:
    """The paper's multiclass probe (Sec. 4 / 5.2): one-hot multi-output RFM on mean-pooled features, on the
    seeded stratified 70/15/15 split of `musicrfm train` / `report` (probes.train.split_indices with `seed`),
    at the layer with the best validation accuracy (as `musicrfm report` picks it), or at `layer` if given.

    `cache` (a JSON file) remembers the chosen layer for these settings, so a rerun fits one layer, not all.
    The fit itself is seeded and deterministic."""
    from musicrfm.probes.extract import FeatureError, load_features
    from musicrfm.probes.rfm import SearchConfig, fit_multiclass
    from musicrfm.probes.train import REGRESSION_CONCEPTS, split_indices

    feature_dir = Path(feature_dir)
    head = load_features(feature_dir, fingerprint, poolings=[])
    if head.concept in REGRESSION_CONCEPTS:
        raise FeatureError(f"{feature_dir}: {head.concept} is a regression; it has no multiclass probe")
    lookup = {c: i for i, c in enumerate(head.classes)}
    y = torch.tensor([lookup[label] for label in head.labels])
    tr, va, te = split_indices(head.labels, seed)
    search = SearchConfig(seed=seed, device=device, **({"trials": trials} if trials else {}))
    key = {"features": str(feature_dir.resolve()), "seed": seed, "trials": search.trials,
           "layers": head.layers, "clips": len(head.labels)}
    lay, clf, X, selection = _best_layer(
        feature_dir, head, layer, cache, key, lambda X: fit_multiclass(X[tr], y[tr], X[va], y[va], len(head.classes),
                                                                       search),
        "val_accuracy", "accuracy", progress)
    test = float((clf.predict(X[te]).cpu() == y[te]).float().mean()) if te else float("nan")
    return FittedProbe(concept=head.concept, classes=tuple(head.classes), layer=lay, prompt=head.prompt,
                       classifier=classifier_to_cpu(clf), val_accuracy=float(clf.val_accuracy),
                       test_accuracy=test, selection=selection, site=head.site)


# --------------------------------------------------------------------------------------------
# The tempo regressor (a regression concept's probe)


@dataclass(frozen=True, eq=False)
class FittedRegressor:
    """An RFM regression probe (tempo: BPM) at one layer, and how it was chosen: what a regression concept
    has instead of a multiclass probe. It reads a value, so it has no classes and no accuracy."""

    concept: str
    layer: int
    prompt: str  # the text conditioning the training features were extracted with
    regressor: object  # probes.rfm.Regressor (CPU tensors)
    val_r2: float
    test_r2: float
    selection: str  # how the layer was chosen
    classes: tuple[str, ...] = ()  # no class to be right about (callers that look one up find none)
    site: str = "residual"  # where the training features were read (extract --site)

    features = FittedProbe.features  # the same re-extraction from audio (reads `prompt`, `layer` and `site`)

    def predict(self, model, clips: Sequence[np.ndarray]) -> np.ndarray:
        """The regressed value (BPM) of each clip: [n] float64."""
        return self.regressor.predict(self.features(model, clips)).double().cpu().numpy()

    def describe(self) -> str:
        return (f"RFM tempo regressor for {self.concept} at layer {self.layer} ({self.selection}; "
                f"validation R² {self.val_r2:.3f}, test {self.test_r2:.3f})")


def fit_regressor(feature_dir: str | Path, *, fingerprint=None, seed: int = 0, trials: int | None = None,
                  layer: int | None = None, device: str | None = None, cache: str | Path | None = None,
                  progress: bool = False) -> FittedRegressor:
    """The regression probe of a regression concept (tempo): RFM regression (probes.rfm.fit_regression, as
    `musicrfm train` fits it) on mean-pooled features and the concept's numeric targets, on the seeded split of
    `musicrfm train` (probes.train.split_indices with `seed`), at the layer with the best validation R², or at
    `layer` if given. `cache` as `fit_probe`'s (the same file; one entry per concept)."""
    from musicrfm.probes.extract import FeatureError, load_features
    from musicrfm.probes.rfm import SearchConfig, fit_regression
    from musicrfm.probes.train import REGRESSION_CONCEPTS, split_indices

    feature_dir = Path(feature_dir)
    head = load_features(feature_dir, fingerprint, poolings=[])
    if head.concept not in REGRESSION_CONCEPTS or head.targets is None:
        raise FeatureError(f"{feature_dir}: {head.concept} has no numeric targets to regress (a regression concept: "
                           f"{', '.join(REGRESSION_CONCEPTS)})")
    y = torch.tensor(head.targets, dtype=torch.float64)
    tr, va, te = split_indices(head.labels, seed)
    search = SearchConfig(seed=seed, device=device, **({"trials": trials} if trials else {}))
    key = {"features": str(feature_dir.resolve()), "seed": seed, "trials": search.trials,
           "layers": head.layers, "clips": len(head.labels), "target": "regression"}
    lay, reg, X, selection = _best_layer(feature_dir, head, layer, cache, key,
                                         lambda X: fit_regression(X[tr], y[tr], X[va], y[va], search),
                                         "val_r2", "R²", progress)
    if te:
        pred = reg.predict(X[te]).double().cpu()
        residual = float((pred - y[te]).square().sum())
        spread = float((y[te] - y[te].mean()).square().sum())
        test = 1.0 - residual / spread if spread > 0 else float("nan")
    else:
        test = float("nan")
    cpu = classifier_to_cpu(reg)  # the predictor's tensors; the same fields as a Classifier's
    return FittedRegressor(concept=head.concept, layer=lay, prompt=head.prompt,
                           regressor=replace(cpu, direction=cpu.direction.cpu()), val_r2=float(reg.val_r2),
                           test_r2=test, selection=selection, site=head.site)
