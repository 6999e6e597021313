"""EnCodec tokens to audio: one-shot decode, streaming decode of a growing token stream, and the WAV
names (protocol.wav's, `write_wav` taking tensors too).

Why streaming needs care: MusicGen's codec (encodec_32khz) decodes with non-causal convolutions and an
LSTM. The convolutions look a few frames ahead, so the last samples of a decode change once more frames
arrive; the LSTM carries state from the whole past, so a decode that starts mid-stream takes a while to
settle. Decoding each chunk on its own therefore clicks at every seam, and re-decoding the whole token
history every chunk (the transformers streamer) costs more the longer the stream runs.

`StreamingDecoder` decodes a bounded window instead: a few already-emitted frames as left context (to
warm up the LSTM and the convolutions' left edge), the frames not yet emitted, and the new ones. It emits
audio only up to `hold_back` frames before the window's end (the right edge is not final yet), and fades
from the previous window's estimate into the new one over `crossfade` samples so that the small
disagreement between the two estimates never appears as a step. The defaults and the error they leave
are measured in docs/streaming-decode.md (bench/bench_decode.py).

Audio leaves this module as float32 on the CPU: it goes to files, sockets and sound cards from there.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from musicrfm.protocol.wav import read_wav
from musicrfm.protocol.wav import write_wav as _write_wav

__all__ = [
    "CodecInfo",
    "StreamingSettings",
    "StreamingDecoder",
    "push_together",
    "decode_tokens",
    "relative_error",
    "SeamStats",
    "seam_discontinuity",
    "write_wav",
    "read_wav",
]

FadeCurve = Literal["equal_gain", "equal_power"]


# --- codec facts and input checks -------------------------------------------------------------------


@dataclass(frozen=True)
class CodecInfo:
    """What decoding needs to know about an EnCodec model, read from its config."""

    sample_rate: int
    hop_length: int  # audio samples per token frame (640 for encodec_32khz: 50 frames/s)
    max_codebooks: int  # codebooks the codec can take (MusicGen sends 4)
    codebook_size: int  # valid codes are [0, codebook_size); MusicGen's pad/BOS id equals codebook_size

    @classmethod
    def of(cls, codec: torch.nn.Module) -> CodecInfo:
        cfg = codec.config
        if cfg.audio_channels != 1:
            raise ValueError(f"only mono codecs are supported, this one has {cfg.audio_channels} channels")
        if cfg.chunk_length is not None:
            # Chunked codecs (encodec_48khz) overlap-add fixed-size frames; MusicGen's codec never does.
            raise ValueError("chunked EnCodec models (config.chunk_length_s set) are not supported")
        return cls(
            sample_rate=int(cfg.sampling_rate),
            hop_length=math.prod(cfg.upsampling_ratios),
            max_codebooks=len(codec.quantizer.layers),
            codebook_size=int(cfg.codebook_size),
        )


def _check_codes(codes: torch.Tensor, info: CodecInfo, shape: str, ndims: tuple[int, ...]) -> torch.Tensor:
    """`codes` as int64 after checking shape, dtype and range; `shape` names the expected layout."""
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"codes must be a torch.Tensor {shape}, got {type(codes).__name__}")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"codes must be integer token ids (torch.long), got dtype {codes.dtype}")
    if codes.dim() not in ndims:
        raise ValueError(f"codes must have shape {shape}, got {tuple(codes.shape)}")
    k = codes.shape[-2]
    if not 1 <= k <= info.max_codebooks:
        raise ValueError(f"codes have {k} codebooks (shape {tuple(codes.shape)}); this codec takes "
                         f"1 to {info.max_codebooks} (MusicGen: 4) in dimension -2 of {shape}")
    if codes.numel():
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= info.codebook_size:
            raise ValueError(f"codes must lie in [0, {info.codebook_size}), got values in [{lo}, {hi}] "
                             f"(MusicGen's pad/BOS id {info.codebook_size} must be removed before decoding)")
    return codes.long()


def _decode(codec: torch.nn.Module, codes: torch.Tensor, hop: int) -> torch.Tensor:
    """Checked codes [B, K, T] -> float32 CPU audio [B, T * hop]."""
    batch, _, frames = codes.shape
    if frames == 0:
        return torch.zeros(batch, 0)
    device = next(codec.parameters()).device
    with torch.inference_mode():
        # EnCodec's decode takes [chunks, B, K, T] plus one scale per chunk; MusicGen's codec is unchunked.
        audio = codec.decode(codes.to(device)[None], [None], return_dict=True).audio_values
    if audio.shape[-1] < frames * hop:
        raise RuntimeError(f"codec returned {audio.shape[-1]} samples for {frames} frames, expected {frames * hop}")
    return audio[:, 0, : frames * hop].float().cpu()


def decode_tokens(codec: torch.nn.Module, codes: torch.Tensor) -> torch.Tensor:
    """One-shot decode (the reference the streaming decode is measured against).

    codes: integer tensor [K, T] or [B, K, T]. Returns float32 CPU audio [T * hop] or [B, T * hop].
    """
    info = CodecInfo.of(codec)
    codes = _check_codes(codes, info, "[K, T] or [B, K, T]", (2, 3))
    if codes.dim() == 2:
        return _decode(codec, codes[None], info.hop_length)[0]
    return _decode(codec, codes, info.hop_length)


# --- streaming decode --------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamingSettings:
    """How a `StreamingDecoder` trades compute and latency for agreement with the one-shot decode.

    Defaults come from bench/bench_decode.py (docs/streaming-decode.md, random-weight codecs with the
    encodec_32khz architecture): the convolutions see a little over 3 frames ahead, so 4 held-back frames
    (80 ms) make the emitted audio independent of frames still to come; 25 frames (0.5 s) of left context
    let the LSTM state converge to float round-off; the 5 ms crossfade turns any disagreement left
    between consecutive windows (e.g. a trained LSTM with a longer memory) into a ramp instead of a step.
    """

    left_context: int = 25  # already-emitted frames decoded again in front of the new ones
    hold_back: int = 4  # frames at the end of each window whose audio is not emitted yet (latency)
    crossfade: int = 160  # samples (5 ms at 32 kHz) faded from the previous window into the new one
    # "equal_gain" (sin^2/cos^2, gains sum to 1) is right for two estimates of the same audio, which is what
    # a seam joins; "equal_power" (sin/cos) suits unrelated signals and bumps coherent ones by up to +3 dB.
    curve: FadeCurve = "equal_gain"

    def __post_init__(self) -> None:
        for name in ("left_context", "hold_back", "crossfade"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if self.curve not in ("equal_gain", "equal_power"):
            raise ValueError(f"curve must be 'equal_gain' or 'equal_power', got {self.curve!r}")


def _fade_in(n: int, curve: FadeCurve) -> torch.Tensor:
    """Gains rising from ~0 to ~1 over n samples (sampled at mid-points, so neither end is exactly 0 or 1)."""
    phase = (torch.arange(n, dtype=torch.float32) + 0.5) / n * (math.pi / 2)
    return torch.sin(phase) ** 2 if curve == "equal_gain" else torch.sin(phase)


class StreamingDecoder:
    """Decodes ONE growing token stream to audio in bounded windows (see the module docstring).

    `push(codes)` takes newly completed frames [K, n] and returns the audio that is now final; `flush()`
    returns the held-back rest when the stream ends. After flush the output holds exactly hop * frames
    samples, with no gap and nothing repeated. Each push decodes at most left_context + hold_back + n
    frames, whatever the stream's length.
    """

    def __init__(self, codec: torch.nn.Module, *, left_context: int = StreamingSettings.left_context,
                 hold_back: int = StreamingSettings.hold_back, crossfade: int = StreamingSettings.crossfade,
                 curve: FadeCurve = StreamingSettings.curve) -> None:
        self.codec = codec
        self.info = CodecInfo.of(codec)
        self.settings = StreamingSettings(left_context, hold_back, crossfade, curve)
        self.reset()

    def reset(self) -> None:
        """Forget the stream: the next push starts a new one."""
        # Frames kept for the next window: up to left_context emitted ones, then the `_pending` not yet
        # emitted. They live on the codec's device so GPU-generated codes never round-trip through the host.
        self._frames: torch.Tensor | None = None
        self._pending = 0
        # The previous window's audio just past the emitted end: what the next segment fades in from.
        self._lookahead = torch.zeros(0)
        self.frames_in = 0  # frames pushed so far
        self.samples_out = 0  # samples returned so far
        self.last_window_frames = 0  # frames in the most recent decode (0 if the last push decoded none)

    def push(self, codes: torch.Tensor) -> torch.Tensor:
        """Add newly completed frames [K, n]; returns the float32 audio that became final (maybe empty)."""
        return push_together([self], [codes])[0]

    def _take(self, codes: torch.Tensor) -> int:
        """Add frames [K, n] to the window; returns how many pending frames are final now (0: no decode due)."""
        codes = _check_codes(codes, self.info, "[K, n]", (2,))
        if self._frames is not None and codes.shape[0] != self._frames.shape[0]:
            raise ValueError(f"this stream has {self._frames.shape[0]} codebooks, the pushed codes have "
                             f"{codes.shape[0]}")
        codes = codes.to(next(self.codec.parameters()).device)
        self._frames = codes if self._frames is None else torch.cat([self._frames, codes], dim=1)
        self._pending += codes.shape[1]
        self.frames_in += codes.shape[1]
        self.last_window_frames = 0
        # Nothing becomes final while fewer than hold_back frames wait (chunks smaller than hold_back): no decode.
        return max(0, self._pending - self.settings.hold_back)

    def flush(self) -> torch.Tensor:
        """End the stream: return the held-back audio (its right edge is final now) and reset."""
        out = self._emit(self._pending) if self._pending else torch.zeros(0)
        self.reset()
        return out

    def _emit(self, count: int, audio: torch.Tensor | None = None) -> torch.Tensor:
        """Return the audio of the first `count` pending frames from the window's decode (`audio`, when it was
        decoded in a batch; else decoded here)."""
        assert self._frames is not None and 0 < count <= self._pending
        hop, fade = self.info.hop_length, self.settings.crossfade
        window = self._frames
        self.last_window_frames = window.shape[1]
        if audio is None:
            audio = _decode(self.codec, window[None], hop)[0]
        start = (window.shape[1] - self._pending) * hop  # where the not-yet-emitted audio begins
        stop = start + count * hop
        segment = audio[start:stop].clone()

        # Fade from the previous window's estimate of these samples into this window's. The previous one
        # covers at most hold_back frames past its emitted end, so with hold_back 0 this is a plain cut.
        n = min(len(self._lookahead), len(segment))
        if n:
            gain = _fade_in(n, self.settings.curve)
            fade_out = 1.0 - gain if self.settings.curve == "equal_gain" else gain.flip(0)
            segment[:n] = segment[:n] * gain + self._lookahead[:n] * fade_out
        self._lookahead = audio[stop : stop + fade].clone()

        self._pending -= count
        emitted = window.shape[1] - self._pending  # emitted frames in this window: the next left context
        keep = min(self.settings.left_context, emitted) + self._pending
        self._frames = window[:, window.shape[1] - keep :]
        self.samples_out += len(segment)
        return segment


def push_together(decoders: list[StreamingDecoder], codes: list[torch.Tensor]) -> list[torch.Tensor]:
    """`decoder.push(codes)` for several streams at once: the windows due for a decode that have the same length
    on the same codec (streams that step together, in their steady state) decode in one batched call."""
    ready = [d._take(c) for d, c in zip(decoders, codes)]
    out = [torch.zeros(0) for _ in decoders]
    batches: dict[tuple[int, int], list[int]] = {}
    for i, (d, n) in enumerate(zip(decoders, ready)):
        if n:
            batches.setdefault((id(d.codec), d._frames.shape[1]), []).append(i)
    for members in batches.values():
        first = decoders[members[0]]
        audio = _decode(first.codec, torch.stack([decoders[i]._frames for i in members]), first.info.hop_length)
        for row, i in enumerate(members):
            out[i] = decoders[i]._emit(ready[i], audio[row])
    return out


# --- measuring a streamed decode --------------------------------------------------------------------
# Shared by tests/engine/test_audio.py and bench/bench_decode.py so the tests' thresholds mean what the bench
# measured. Errors are relative to the reference's RMS about its mean: random-weight codecs put out a large
# DC offset, and counting it as signal would make every error look smaller than it is.


def relative_error(audio: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(RMS, max) of |audio - reference| over the reference's RMS about its mean."""
    if audio.shape != reference.shape:
        raise ValueError(f"audio {tuple(audio.shape)} and reference {tuple(reference.shape)} differ in shape")
    scale = float((reference - reference.mean()).pow(2).mean().sqrt())
    if scale == 0.0:
        raise ValueError("reference is constant: relative error is undefined")
    err = (audio - reference).abs()
    return float(err.pow(2).mean().sqrt()) / scale, float(err.max()) / scale


@dataclass(frozen=True)
class SeamStats:
    """Sample-to-sample jumps at seams and between them, in units of the signal's own jumps."""

    mean: float  # mean over seams
    worst: float  # largest seam
    between: float  # mean at mid-points between seams (1.0 without a reference, by construction)


def seam_discontinuity(audio: torch.Tensor, seams: list[int], reference: torch.Tensor | None = None,
                       width: int = 32) -> SeamStats:
    """How large the jumps at seams are (seams: sample indices where a new segment starts).

    The statistic at a position is max |first difference| within +-width samples. Without a reference it
    is taken on `audio` itself; with one, on the error `audio - reference`, i.e. only the jumps the
    streaming added. Either way it is divided by the same statistic of the signal (the reference if
    given) at mid-points between seams. The reference-free form cannot see a click in noise-like audio
    (noise jumps as much as a click does), which is what random-weight codecs put out; the error form can.
    """
    signal = audio if reference is None else audio - reference
    jumps = signal.diff().abs()  # jumps[i] = |signal[i + 1] - signal[i]|, so a seam s shows at s - 1
    own = (audio if reference is None else reference).diff().abs()

    def peak(x: torch.Tensor, at: int) -> float:
        return float(x[max(at - 1 - width, 0) : at - 1 + width].max())

    inner = [s for s in seams if width < s < len(audio) - width]
    bounds = [0, *inner, len(audio)]
    mids = [(a + b) // 2 for a, b in zip(bounds, bounds[1:]) if b - a > 2 * width]
    if not inner or not mids:
        raise ValueError(f"need seams more than {width} samples inside the audio and apart, got {seams[:5]}...")
    scale = sum(peak(own, m) for m in mids) / len(mids)
    at = [peak(jumps, s) / scale for s in inner]
    return SeamStats(mean=sum(at) / len(at), worst=max(at),
                     between=sum(peak(jumps, m) for m in mids) / len(mids) / scale)


# --- WAV files ---------------------------------------------------------------------------------------


def write_wav(path: str | os.PathLike, audio: torch.Tensor | np.ndarray, sample_rate: int) -> None:
    """protocol.wav's `write_wav` (mono float in [-1, 1] -> 16-bit PCM), taking a tensor as well."""
    if isinstance(audio, torch.Tensor):
        audio = audio.detach().float().cpu().numpy()
    _write_wav(path, audio, sample_rate)
