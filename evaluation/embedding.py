"""Audio embeddings for the distribution metrics (musicrfm.evaluation.metrics) and the CLAP score.

  AudioEmbedder          protocol: `.name` (recorded with every number), `.embed(audio, sr)` -> [n, d]
  ClapEmbedder(model)    LAION CLAP through transformers (ClapModel + ClapProcessor); user-supplied
                         weights only (a Hugging Face id in the local cache, or a local directory)
  LogMelStatsEmbedder()  "logmel-stats-v1": the offline fallback, no weights (not CLAP); with
                         pitch_classes=False "logmel-timbre-v1", the same without the pitch-class profile
  clap_score(audio, texts, sr, model=None)
                         per-pair CLAP cosine, or a result saying "unavailable: no CLAP weights
                         supplied" when no model is given: never an estimate from something else

Audio is mono float: one clip as a 1-D array, or several as a list of 1-D arrays (lengths may
differ) or a 2-D array [clips, samples]. Every embedder resamples to its own rate itself.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from musicrfm.evaluation.audio_checks import mono_signal, pitch_class_profile
from musicrfm.probes.dataset import resample

__all__ = [
    "CLAP_UNAVAILABLE",
    "AudioEmbedder",
    "ClapEmbedder",
    "ClapScoreResult",
    "ClapWeightsNotFoundError",
    "LogMelStatsEmbedder",
    "as_clips",
    "clap_score",
]

CLAP_UNAVAILABLE = "unavailable: no CLAP weights supplied"


@runtime_checkable
class AudioEmbedder(Protocol):
    """What the evaluation needs from an embedder. `name` identifies the embedding space (model
    and version): record it with every FD / MMD value, which are comparable only within one name."""

    name: str

    def embed(self, audio, sample_rate: int) -> np.ndarray:
        """Clips -> float64 [n_clips, dim]."""
        ...


def as_clips(audio) -> list[np.ndarray]:
    """One clip (1-D), clips as a 2-D array [n, samples] or a list of 1-D arrays -> a list of
    finite float32 1-D arrays (ValueError otherwise)."""
    if isinstance(audio, np.ndarray) or not isinstance(audio, (list, tuple)):
        array = np.asarray(audio)
        if array.ndim == 1:
            items = [array]
        elif array.ndim == 2:
            items = list(array)
        else:
            raise ValueError(f"audio must be 1-D (one clip) or 2-D [clips, samples], got shape {array.shape}")
    else:
        items = list(audio)
    if not items:
        raise ValueError("no audio clips given")
    return [mono_signal(item, f"clip {i}", np.float32) for i, item in enumerate(items)]


def _check_rate(sample_rate) -> int:
    if not (isinstance(sample_rate, (int, np.integer)) and sample_rate > 0):
        raise ValueError(f"sample_rate must be a positive integer, got {sample_rate!r}")
    return int(sample_rate)


# --------------------------------------------------------------------------------------------
# The offline fallback


def _mel_filterbank(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """Triangular filters on the HTK mel scale, each normalised to unit area: [n_mels, bins]."""

    def hz_to_mel(f):
        return 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)

    def mel_to_hz(m):
        return 700.0 * (10.0 ** (np.asarray(m) / 2595.0) - 1.0)

    freqs = np.fft.rfftfreq(n_fft, 1.0 / sr)
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (freqs[None, :] - lower) / (centre - lower)
    falling = (upper - freqs[None, :]) / (upper - centre)
    bank = np.maximum(0.0, np.minimum(rising, falling))
    area = bank.sum(axis=1, keepdims=True)
    return bank / np.where(area > 0, area, 1.0)


LOGMEL_STATS = "logmel-stats-v1"
LOGMEL_TIMBRE = "logmel-timbre-v1"
LOGMEL_EMBEDDERS = (LOGMEL_STATS, LOGMEL_TIMBRE)


def check_logmel_name(name: str) -> str:
    """`name` if it names one of the log-mel embedders, else a ValueError listing them."""
    if name not in LOGMEL_EMBEDDERS:
        raise ValueError(f"unknown embedder {name!r}; choose one of {', '.join(LOGMEL_EMBEDDERS)}")
    return name


class LogMelStatsEmbedder:
    """Hand-made summary statistics of a clip: the documented offline fallback ("logmel-stats-v1"), or the same
    without its pitch-class profile ("logmel-timbre-v1", `pitch_classes=False`): on a notes or chords sweep the
    profile is the very thing steering changes, so FD / MMD² on the full embedding partly measure the intended
    change; the timbre variant measures what else moved.

    Each clip is resampled to 16 kHz (fixed, whatever the input rate), then:
      - log-mel spectrogram: 1024-point Hann STFT (64 ms), hop 256 (16 ms), 64 HTK mel bands
        30 Hz-8 kHz, power in dB (10 log10, floored at -100 dB);
      - the mean and the standard deviation of each band over time (64 + 64 values: the
        long-term spectral envelope and how much each band moves);
      - the clip's 12-bin pitch-class profile (`musicrfm.evaluation.audio_checks.pitch_class_profile`, sums to 1),
        scaled by 10 so it is not drowned by the dB statistics.
    Output: float64 [n, 140] ([n, 128] without the profile). Deterministic (numpy only, no randomness, no weights).

    What it captures: timbre and spectral balance, loudness per band (the clip's level is kept:
    a clip 6 dB quieter moves every mean by 6), dynamics per band, pitch-class content.
    What it does not: anything learned. It knows no instruments, genres or semantics, nothing of
    temporal order beyond the per-band spread (rhythm, melody and structure are invisible), and
    it does not know which differences matter to a listener. It is NOT CLAP: FD or MMD computed on
    it are not comparable with papers' FAD / CLAP-based numbers (nor with each other across
    embedder versions); use it to compare settings within one experiment when no CLAP weights
    are available, and report its name with every value.
    """

    sample_rate = 16_000
    n_fft = 1024
    hop = 256
    n_mels = 64
    fmin = 30.0
    fmax = 8000.0
    floor_db = -100.0
    chroma_scale = 10.0

    def __init__(self, pitch_classes: bool = True) -> None:
        self.pitch_classes = pitch_classes
        self.name = LOGMEL_STATS if pitch_classes else LOGMEL_TIMBRE
        self._bank = _mel_filterbank(self.sample_rate, self.n_fft, self.n_mels, self.fmin, self.fmax)

    @classmethod
    def named(cls, name: str) -> "LogMelStatsEmbedder":
        return cls(pitch_classes=check_logmel_name(name) == LOGMEL_STATS)

    @property
    def dim(self) -> int:
        return 2 * self.n_mels + (12 if self.pitch_classes else 0)

    def embed(self, audio, sample_rate: int) -> np.ndarray:
        rate = _check_rate(sample_rate)
        return np.stack([self._embed_one(clip, rate) for clip in as_clips(audio)])

    def _embed_one(self, clip: np.ndarray, rate: int) -> np.ndarray:
        x = resample(clip, rate, self.sample_rate).astype(np.float64)
        if len(x) < self.n_fft:
            x = np.concatenate([x, np.zeros(self.n_fft - len(x))])
        frames = np.lib.stride_tricks.sliding_window_view(x, self.n_fft)[:: self.hop]
        power = np.abs(np.fft.rfft(frames * np.hanning(self.n_fft), axis=1)) ** 2
        mel = power @ self._bank.T
        db = 10.0 * np.log10(np.maximum(mel, 10.0 ** (self.floor_db / 10.0)))
        stats = [db.mean(axis=0), db.std(axis=0)]
        if self.pitch_classes:
            stats.append(self.chroma_scale * pitch_class_profile(x, self.sample_rate))
        return np.concatenate(stats)


# --------------------------------------------------------------------------------------------
# CLAP


class ClapWeightsNotFoundError(FileNotFoundError):
    """The CLAP weights named are neither a local directory nor in the Hugging Face cache."""


@contextlib.contextmanager
def _numpy_seed(seed: int):
    # The CLAP feature extractor crops clips longer than its window with np.random (global state):
    # seed it for reproducible embeddings, and leave the caller's random state as it was.
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def _pooled(output):
    # transformers < 5 returns the projected embeddings as a tensor; 5.x a model output whose
    # pooler_output holds them
    return output if hasattr(output, "ndim") else output.pooler_output


class ClapEmbedder:
    """LAION CLAP audio (and text) embeddings with transformers' `ClapModel` and `ClapProcessor`.

    `model`: a local directory written by `save_pretrained` (config, weights, feature extractor
    and tokenizer files), or a Hugging Face id (e.g. "laion/clap-htsat-unfused",
    "laion/larger_clap_music") that is already in the local cache. Nothing is downloaded unless
    `allow_download=True`; this project's machines have no network, and a missing model raises
    `ClapWeightsNotFoundError` naming it and how to supply it.

    `embed(audio, sample_rate)`: each clip is resampled to the processor's rate (48 kHz for the
    released models), turned into features by the processor's feature extractor one clip at a
    time (so a clip's embedding never depends on the rest of its batch; `is_longer`, which only
    fused models read, is set from the clip's own length), and run through `get_audio_features`;
    the result is L2-normalised: float64 [n, projection_dim]. Clips longer than the processor's
    window (10 s for the released models) are cropped or fused as the processor's `truncation`
    setting says; its random choices are seeded (numpy seed 0, per clip), so embeddings are
    reproducible.

    `clap_score(audio, texts, sample_rate)`: the cosine similarity between each clip's audio
    embedding and its text's embedding, in [-1, 1], one value per (clip, text) pair. Reported raw:
    not multiplied by 100 and not clipped at 0 (some papers report 100 * max(cos, 0); the MusicRFM
    paper's CLAP values, e.g. 0.332 for unsteered MusicGen-large, are below 1 and so appear to be
    raw cosines too, though the paper does not say).
    """

    def __init__(self, model: str | os.PathLike, *, device: str = "cpu", batch_size: int = 8,
                 allow_download: bool = False) -> None:  # fmt: skip
        from transformers import ClapModel, ClapProcessor

        self.model_id = str(model)
        path = Path(model).expanduser()
        # a Hugging Face id is "name" or "owner/name"; anything else is meant as a directory
        looks_like_path = (not isinstance(model, str) or self.model_id.startswith(("/", ".", "~"))
                           or self.model_id.count("/") > 1 or "\\" in self.model_id)  # fmt: skip
        if path.is_dir():
            source, local_only = str(path), True
        elif looks_like_path:
            raise ClapWeightsNotFoundError(
                f"CLAP model directory not found: {path} (expected a directory written by "
                f"save_pretrained, or a Hugging Face id such as laion/clap-htsat-unfused)"
            )
        else:
            source, local_only = self.model_id, not allow_download
        try:
            self.processor = ClapProcessor.from_pretrained(source, local_files_only=local_only)
            self.model = ClapModel.from_pretrained(source, local_files_only=local_only)
        except OSError as error:
            if path.is_dir():
                where = (f"{path} is not a complete CLAP directory (save_pretrained of both the ClapModel "
                         f"and the ClapProcessor: config, weights, preprocessor and tokenizer files): {error}")
            else:
                fetched = ("the download failed" if allow_download else
                           "nothing is downloaded (allow_download=False; this project's machines have no network)")
                where = (f"CLAP weights {self.model_id!r} not found: not a local directory and not in the "
                         f"Hugging Face cache, and {fetched}. On a connected machine run "
                         f"`hf download {self.model_id}` and copy the cache "
                         f"(~/.cache/huggingface/hub) over, or save_pretrained the model and processor to a "
                         f"directory and pass that directory")
            raise ClapWeightsNotFoundError(
                f"{where}. Without CLAP weights there is no CLAP score ('{CLAP_UNAVAILABLE}'); "
                f"musicrfm.evaluation.embedding.LogMelStatsEmbedder is the offline fallback for FD / MMD (its numbers "
                f"are not CLAP numbers)."
            ) from error
        self.device = device
        self.batch_size = max(1, int(batch_size))
        self.model.to(device).eval()
        self.sample_rate = int(self.processor.feature_extractor.sampling_rate)
        self.name = f"clap:{self.model_id}"

    def embed(self, audio, sample_rate: int) -> np.ndarray:
        """Clips -> L2-normalised CLAP audio embeddings, float64 [n, d]."""
        import torch

        rate = _check_rate(sample_rate)
        clips = [resample(clip, rate, self.sample_rate) for clip in as_clips(audio)]
        extractor = self.processor.feature_extractor
        window = getattr(extractor, "nb_max_samples", extractor.max_length_s * extractor.sampling_rate)
        out = []
        for start in range(0, len(clips), self.batch_size):
            features, longer = [], []
            for clip in clips[start : start + self.batch_size]:
                with _numpy_seed(0):
                    item = extractor([clip], sampling_rate=self.sample_rate, return_tensors="pt")
                features.append(item["input_features"])
                # is_longer from the clip's length: the extractor's "fusion" mode marks a random
                # clip of a batch with no long clip as longer (only fused models read the flag)
                longer.append(torch.tensor([[len(clip) > window]]))
            with torch.inference_mode():
                embedded = _pooled(self.model.get_audio_features(
                    input_features=torch.cat(features).to(self.device),
                    is_longer=torch.cat(longer).to(self.device),
                ))  # fmt: skip
            out.append(torch.nn.functional.normalize(embedded.double(), dim=-1).cpu().numpy())
        return np.concatenate(out)

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> L2-normalised CLAP text embeddings, float64 [n, d]."""
        import torch

        if isinstance(texts, str) or not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("texts must be a non-empty list of strings")
        out = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.processor.tokenizer(list(texts[start : start + self.batch_size]), padding=True,
                                              truncation=True, return_tensors="pt")  # fmt: skip
            with torch.inference_mode():
                embedded = _pooled(self.model.get_text_features(
                    input_ids=tokens["input_ids"].to(self.device),
                    attention_mask=tokens["attention_mask"].to(self.device),
                ))  # fmt: skip
            out.append(torch.nn.functional.normalize(embedded.double(), dim=-1).cpu().numpy())
        return np.concatenate(out)

    def clap_score(self, audio, texts: Sequence[str], sample_rate: int) -> np.ndarray:
        """Cosine similarity of each clip with its text (raw, in [-1, 1]): float64 [n]."""
        clips = as_clips(audio)
        if isinstance(texts, str) or len(texts) != len(clips):
            count = 1 if isinstance(texts, str) else len(texts)
            raise ValueError(f"clap_score pairs clips with texts: got {len(clips)} clip(s) and {count} text(s)")
        return np.einsum("nd,nd->n", self.embed(clips, sample_rate), self.embed_text(texts))


@dataclass(frozen=True)
class ClapScoreResult:
    """Per-pair CLAP scores, or None with the reason. `embedder` names the weights used."""

    scores: np.ndarray | None
    reason: str
    embedder: str | None = None

    @property
    def available(self) -> bool:
        return self.scores is not None

    @property
    def mean(self) -> float | None:
        return None if self.scores is None else float(np.mean(self.scores))


def clap_score(audio, texts: Sequence[str], sample_rate: int,
               model: ClapEmbedder | str | os.PathLike | None = None) -> ClapScoreResult:  # fmt: skip
    """CLAP score of each (clip, text) pair (see `ClapEmbedder.clap_score` for the convention).

    With `model=None` (no CLAP weights supplied) the result has `scores=None` and the reason
    "unavailable: no CLAP weights supplied": there is no substitute estimate. A model that is
    supplied but cannot be found raises `ClapWeightsNotFoundError` (a wrong path is an error,
    not a missing metric).
    """
    if model is None:
        return ClapScoreResult(scores=None, reason=CLAP_UNAVAILABLE)
    embedder = model if isinstance(model, ClapEmbedder) else ClapEmbedder(model)
    scores = embedder.clap_score(audio, texts, sample_rate)
    return ClapScoreResult(scores=scores, reason="ok", embedder=embedder.name)
