"""EnCodec tokens to audio: one-shot decode, streaming decode of a growing token stream, and the WAV
names (protocol.wav's, `write_wav` taking tensors too).

Why streaming needs care: MusicGen's codec (encodec_32khz) decodes with non-causal convolutions and an
LSTM. The convolutions look a few frames ahead, so the last samples of a decode change once more frames
arrive; the LSTM carries state from the whole past, so a decode that starts mid-stream takes a while to
settle. Decoding each chunk on its own therefore clicks at every seam, and re-decoding the whole token
history every chunk (the transformers streamer) costs more the longer the stream runs.

`ExactStreamingDecoder` (the default for every transformers EnCodec, `streaming_decoder`) carries the LSTM's
state from push to push and decodes only the frames the convolutions reach: its audio equals the one-shot
decode to float round-off. `StreamingDecoder`, the fallback for a codec of unknown layers, decodes a bounded
window instead: a few already-emitted frames as left context (to
warm up the LSTM and the convolutions' left edge), the frames not yet emitted, and the new ones. It emits
audio only up to `hold_back` frames before the window's end (the right edge is not final yet), and fades
from the previous window's estimate into the new one over `crossfade` samples so that the small
disagreement between the two estimates never appears as a step. The defaults and the error they leave
are measured in docs/streaming-decode.md (bench/bench_decode.py).

Audio leaves this module as float32 on the CPU: it goes to files, sockets and sound cards from there.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Literal, Union

import numpy as np
import torch

from musicrfm.protocol.wav import read_wav
from musicrfm.protocol.wav import write_wav as _write_wav

__all__ = [
    "CodecInfo",
    "StreamingSettings",
    "StreamingDecoder",
    "ExactStreamingDecoder",
    "ExactLayout",
    "CapturedStacks",
    "streaming_decoder",
    "decoding_of",
    "DECODINGS",
    "push_together",
    "decode_tokens",
    "relative_error",
    "SeamStats",
    "seam_discontinuity",
    "write_wav",
    "read_wav",
]

log = logging.getLogger("musicrfm.audio")

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


def _appended(kept: torch.Tensor | None, codes: torch.Tensor, codec: torch.nn.Module,
              info: CodecInfo) -> tuple[torch.Tensor, int]:
    """A stream's kept frames with pushed `codes` [K, n] appended (checked; on the codec's device, so GPU-generated
    codes never round-trip through the host), and n."""
    codes = _check_codes(codes, info, "[K, n]", (2,))
    if kept is not None and codes.shape[0] != kept.shape[0]:
        raise ValueError(f"this stream has {kept.shape[0]} codebooks, the pushed codes have {codes.shape[0]}")
    codes = codes.to(next(codec.parameters()).device)
    return (codes if kept is None else torch.cat([kept, codes], dim=1)), codes.shape[1]


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

    @property
    def hold_back(self) -> int:
        """Frames whose audio waits for frames to come (the decode's latency, in frames)."""
        return self.settings.hold_back

    def push(self, codes: torch.Tensor) -> torch.Tensor:
        """Add newly completed frames [K, n]; returns the float32 audio that became final (maybe empty)."""
        return push_together([self], [codes])[0]

    def _take(self, codes: torch.Tensor) -> int:
        """Add frames [K, n] to the window; returns how many pending frames are final now (0: no decode due)."""
        self._frames, n = _appended(self._frames, codes, self.codec, self.info)
        self._pending += n
        self.frames_in += n
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


def _windowed_round(decoders: list[StreamingDecoder], codes: list[torch.Tensor]) -> list[torch.Tensor]:
    """Windowed pushes: the windows due for a decode with the same length on one codec decode in one call."""
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


# --- exact streaming decode: the LSTM's state carried, the convolutions' reach decoded ---------------------
#
# EnCodec's decoder is (convolutions) -> LSTM -> (upsampling convolutions). Only the LSTM remembers the whole
# past, and its state after frame t is a fixed thing: carry it from push to push instead of re-deriving it
# from 25 frames of left context, and everything else needs only the few frames its convolutions reach. Each
# push then decodes the new frames plus those reaches (about 2x the new frames at chunks of 5, against 7x for
# the windowed decoder) and its audio equals the one-shot decode to float round-off, whatever the LSTM's memory.


@dataclass(frozen=True)
class _Reach:
    """How many input frames on each side a stack of layers reads to make one output frame."""

    left: int
    right: int


def _span_back(layer: torch.nn.Module, lo: int, hi: int) -> tuple[int, int] | None:
    """Input index range [lo', hi'] that the output indices [lo, hi] of `layer` depend on, or None for a layer
    of unknown shape. Mirrors transformers' EnCodec padding: "same" convolutions split their padding
    (kernel - stride) right = total // 2, left = the rest (all left when causal); transposed convolutions trim
    it the same way from their output."""
    from transformers.models.encodec import modeling_encodec as m  # the layer classes it knows

    if isinstance(layer, (torch.nn.ELU, torch.nn.Identity)):
        return lo, hi
    if isinstance(layer, m.EncodecConv1d):
        if int(layer.stride) != 1:
            return None
        total = int(layer.padding_total)
        right = 0 if layer.causal else total // 2
        return lo - (total - right), hi + right
    if isinstance(layer, m.EncodecConvTranspose1d):
        kernel, stride = layer.conv.kernel_size[0], layer.conv.stride[0]
        total = kernel - stride
        right = math.ceil(total * layer.trim_right_ratio) if layer.causal else total // 2
        left = total - right
        # raw output o = i * stride + j (0 <= j < kernel); trimmed index = o - left
        return -((-(lo + left - kernel + 1)) // stride), (hi + left) // stride
    if isinstance(layer, m.EncodecResnetBlock):
        spans = [(lo, hi)]
        for inner in reversed(layer.block):
            span = _span_back(inner, *spans[0]) if spans[0] is not None else None
            spans[0] = span
        shortcut = _span_back(layer.shortcut, lo, hi)
        if spans[0] is None or shortcut is None:
            return None
        return min(spans[0][0], shortcut[0]), max(spans[0][1], shortcut[1])
    return None


def _reach(layers, samples_per_frame: int) -> _Reach | None:
    """The frames a stack reads for one frame of its output (`samples_per_frame` output samples a frame)."""
    frame = 1000  # any frame far from the start: the reach is the same everywhere inside the stream
    lo, hi = frame * samples_per_frame, (frame + 1) * samples_per_frame - 1
    for layer in reversed(list(layers)):
        span = _span_back(layer, lo, hi)
        if span is None:
            return None
        lo, hi = span
    return _Reach(left=frame - lo, right=hi - frame)


@dataclass(frozen=True)
class ExactLayout:
    """An EnCodec decoder split at its LSTM: `before` (frame rate) -> `lstm` -> `after` (up to audio)."""

    before: tuple[torch.nn.Module, ...]
    lstm: torch.nn.LSTM
    after: tuple[torch.nn.Module, ...]
    before_reach: _Reach
    after_reach: _Reach

    @classmethod
    def of(cls, codec: torch.nn.Module) -> ExactLayout | None:
        """The layout, or None when the decoder is not transformers' EnCodec stack of known layers (the
        windowed `StreamingDecoder` then serves, which needs nothing but `codec.decode`)."""
        try:
            from transformers.models.encodec.modeling_encodec import EncodecLSTM
        except ImportError:
            return None
        layers = list(getattr(getattr(codec, "decoder", None), "layers", []))
        at = [i for i, layer in enumerate(layers) if isinstance(layer, EncodecLSTM)]
        if len(at) != 1:
            return None
        before, after = layers[: at[0]], layers[at[0] + 1 :]
        before_reach = _reach(before, 1)
        after_reach = _reach(after, CodecInfo.of(codec).hop_length)
        if before_reach is None or after_reach is None:
            return None
        return cls(tuple(before), layers[at[0]].lstm, tuple(after), before_reach, after_reach)


class ExactStreamingDecoder:
    """Decodes ONE growing token stream to audio equal to the one-shot decode (to float round-off).

    Same interface as `StreamingDecoder` (push / flush / reset, frames_in, samples_out, last_window_frames).
    State kept between pushes: the codes the first convolutions still need, the LSTM's (h, c) after the
    frames it has consumed, and the LSTM outputs the upsampling convolutions still need. A frame's audio
    is final, and emitted, once the frames its convolutions reach to its right have arrived:
    `hold_back` = both stacks' right reach (4 frames for encodec_32khz: 80 ms, as the windowed default).
    """

    def __init__(self, codec: torch.nn.Module, layout: ExactLayout | None = None,
                 stacks: CapturedStacks | None = None) -> None:
        """`stacks`: run the convolution stacks as the lane's traces (CapturedStacks; None: eagerly)."""
        self.codec = codec
        self.info = CodecInfo.of(codec)
        self.stacks = stacks
        self.layout = layout or ExactLayout.of(codec)
        if self.layout is None:
            raise ValueError("this codec's decoder is not an EnCodec stack this decoder knows; "
                             "use StreamingDecoder (windowed)")
        self.hold_back = self.layout.before_reach.right + self.layout.after_reach.right
        self.reset()

    def reset(self) -> None:
        """Forget the stream: the next push starts a new one."""
        self._codes: torch.Tensor | None = None  # frames [codes_start, frames_in)
        self._codes_start = 0
        lstm, param = self.layout.lstm, next(self.codec.parameters())
        zeros = torch.zeros(lstm.num_layers, 1, lstm.hidden_size, device=param.device, dtype=param.dtype)
        self._state = (zeros, zeros)  # the LSTM's (h, c) after `_consumed` frames (zeros: nn.LSTM's start)
        self._consumed = 0
        self._lstm_out: torch.Tensor | None = None  # [channels, frames] for frames [out_start, _consumed)
        self._out_start = 0
        self._emitted = 0
        self.frames_in = 0
        self.samples_out = 0
        self.last_window_frames = 0

    def push(self, codes: torch.Tensor) -> torch.Tensor:
        """Add newly completed frames [K, n]; returns the float32 audio that became final (maybe empty)."""
        return push_together([self], [codes])[0]

    def flush(self) -> torch.Tensor:
        """End the stream: the rest of its audio (the stream's true end is known now), then reset."""
        out = _exact_round([self], final=True)[0]
        self.reset()
        return out

    def _take(self, codes: torch.Tensor) -> None:
        self._codes, n = _appended(self._codes, codes, self.codec, self.info)
        self.frames_in += n
        self.last_window_frames = 0

    # What the next round decodes: (window start, window stop, first kept, end kept), absolute frames.
    def _lstm_work(self, final: bool) -> tuple[int, int, int, int] | None:
        reach = self.layout.before_reach
        ready = self.frames_in if final else self.frames_in - reach.right
        if ready <= self._consumed:
            return None
        return max(0, self._consumed - reach.left), self.frames_in, self._consumed, ready

    def _audio_work(self, final: bool) -> tuple[int, int, int, int] | None:
        reach = self.layout.after_reach
        ready = self._consumed if final and self._consumed == self.frames_in else self._consumed - reach.right
        if ready <= self._emitted:
            return None
        return max(0, self._emitted - reach.left), self._consumed, self._emitted, ready


def _stack(layers, x: torch.Tensor) -> torch.Tensor:
    for layer in layers:
        x = layer(x)
    return x


def _eager(decoder: ExactStreamingDecoder, part: str, x: torch.Tensor) -> torch.Tensor:
    """One of the exact decoder's two stacks: "before" (codes [B, K, T] -> the LSTM's input) or "after" (the LSTM's
    output -> audio)."""
    if part == "before":
        return _stack(decoder.layout.before, decoder.codec.quantizer.decode(x.transpose(0, 1)))
    return _stack(decoder.layout.after, x)


def _run(decoder: ExactStreamingDecoder, part: str, x: torch.Tensor) -> torch.Tensor:
    return decoder.stacks.run(decoder, part, x) if decoder.stacks is not None else _eager(decoder, part, x)


_TRACING = threading.Lock()


class CapturedStacks:
    """The exact decoder's two stacks as TorchScript traces, for the decoders of one lane
    (engine.loop.Engine.codec_stacks).

    Why, as for the language model's step (engine.graphs): a trace runs in C++ with the GIL released, so lanes
    decode in parallel, and the stacks' Python between small convolutions goes. One trace per stack, made the first
    time it runs (tracing is Python-heavy: a trace per window length cost a new stream ~1 s of traces, enough to
    starve the other threads). The stacks compute paddings from the window's length in Python, which a trace bakes
    in, so each input shape (streams x window) is checked once, bit for bit, against the eager stack before the
    trace serves it; a shape where it differs runs eagerly from then on, and says so once. A trace that cannot be
    made leaves the lane decoding eagerly, said once (`reason`). At most MAX_SHAPES shapes are remembered; past
    them a new shape runs eagerly."""

    MAX_SHAPES = 256

    def __init__(self) -> None:
        self._traces: dict[tuple, torch.jit.ScriptFunction] = {}
        self._shapes: dict[tuple, bool] = {}  # (trace key, input shape) -> the trace reproduces the eager stack
        self.reason: str | None = None
        self.replays = 0

    def run(self, decoder: ExactStreamingDecoder, part: str, x: torch.Tensor) -> torch.Tensor:
        if self.reason is not None:
            return _eager(decoder, part, x)
        key = (id(decoder.codec), part, x.dtype)
        trace = self._traces.get(key)
        if trace is None:
            trace = self._trace(decoder, part, x)
            if trace is None:
                return _eager(decoder, part, x)
            self._traces[key] = trace
        shape = (key, tuple(x.shape))
        known = self._shapes.get(shape)
        if known is None:
            expected = _eager(decoder, part, x)
            if len(self._shapes) < self.MAX_SHAPES:
                self._shapes[shape] = self._same(trace, x, expected, part)
            return expected
        if not known:
            return _eager(decoder, part, x)
        self.replays += 1
        return trace(x)

    def _trace(self, decoder: ExactStreamingDecoder, part: str, x: torch.Tensor) -> torch.jit.ScriptFunction | None:
        try:
            # TracerWarnings say, for every layer, that the trace bakes in the paddings computed from the length:
            # silenced. Warning filters are the process's, so lanes tracing at once take turns, lest one restore
            # the filters in the middle of another's trace.
            with _TRACING, warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                return torch.jit.trace(lambda x: _eager(decoder, part, x), (x,), check_trace=False)
        except Exception as exc:  # any failure: decode eagerly from now on, and say so once
            self._fail(f"tracing the codec's {part}-LSTM stack for {tuple(x.shape)} failed "
                       f"({type(exc).__name__}: {exc})")
            return None

    def _same(self, trace: torch.jit.ScriptFunction, x: torch.Tensor, expected: torch.Tensor, part: str) -> bool:
        try:
            same = all(torch.equal(trace(x), expected) for _ in range(3))  # TorchScript settles its plan in 1-2 calls
        except Exception:  # a shape the trace cannot take: like one it computes otherwise
            same = False
        if not same and not any(v is False for v in self._shapes.values()):
            log.warning("the codec's traced %s-LSTM stack differs from the eager one for input %s: such inputs "
                        "decode eagerly", part, tuple(x.shape))
        return same

    def _fail(self, reason: str) -> None:
        self.reason = reason
        log.warning("%s; decoding eagerly", reason)


def _grouped(decoders: list, work: list) -> dict[tuple, list[int]]:
    """Indices of the decoders whose work has the same shape (so one batched call serves them)."""
    groups: dict[tuple, list[int]] = {}
    for i, (d, w) in enumerate(zip(decoders, work)):
        if w is not None:
            start, stop, first, end = w
            groups.setdefault((id(d.codec), stop - start, first - start, end - start), []).append(i)
    return groups


def _exact_round(decoders: list[ExactStreamingDecoder], final: bool = False) -> list[torch.Tensor]:
    """Advance each decoder's LSTM over its frames that became final, then emit the audio that did."""
    out = [torch.zeros(0) for _ in decoders]
    with torch.inference_mode():
        work = [d._lstm_work(final) for d in decoders]
        for (_, _, first, end), members in _grouped(decoders, work).items():
            lead = decoders[members[0]]
            windows = []
            for i in members:
                d = decoders[i]
                start, stop = work[i][0], work[i][1]
                windows.append(d._codes[:, start - d._codes_start : stop - d._codes_start])
            codes = torch.stack(windows)  # [B, K, T]
            x = _run(lead, "before", codes)
            x = x[..., first:end].permute(2, 0, 1)  # [T, B, C], the frames that are final before the LSTM
            h0 = torch.cat([decoders[i]._state[0] for i in members], dim=1)
            c0 = torch.cat([decoders[i]._state[1] for i in members], dim=1)
            y, (h, c) = lead.layout.lstm(x, (h0, c0))
            y = (y + x).permute(1, 2, 0)  # EncodecLSTM's skip connection; back to [B, C, T]
            for row, i in enumerate(members):
                d = decoders[i]
                d._state = (h[:, row : row + 1].clone(), c[:, row : row + 1].clone())
                d._lstm_out = y[row] if d._lstm_out is None else torch.cat([d._lstm_out, y[row]], dim=1)
                d._consumed = work[i][3]
                d.last_window_frames = work[i][1] - work[i][0]
        work = [d._audio_work(final) for d in decoders]
        for (_, _, first, end), members in _grouped(decoders, work).items():
            lead = decoders[members[0]]
            hop = lead.info.hop_length
            x = torch.stack([decoders[i]._lstm_out[:, work[i][0] - decoders[i]._out_start : work[i][1] - decoders[i]._out_start]
                             for i in members])
            audio = _run(lead, "after", x)[:, 0, first * hop : end * hop].float().cpu()
            for row, i in enumerate(members):
                d = decoders[i]
                out[i] = audio[row]
                d._emitted = work[i][3]
                d.samples_out += audio.shape[1]
    for d in decoders:  # keep only what the next round's convolutions reach back to
        keep_codes = max(0, d._consumed - d.layout.before_reach.left)
        if d._codes is not None and keep_codes > d._codes_start:
            d._codes = d._codes[:, keep_codes - d._codes_start :]
            d._codes_start = keep_codes
        keep_out = max(0, d._emitted - d.layout.after_reach.left)
        if d._lstm_out is not None and keep_out > d._out_start:
            d._lstm_out = d._lstm_out[:, keep_out - d._out_start :]
            d._out_start = keep_out
    return out


AnyStreamingDecoder = Union[ExactStreamingDecoder, StreamingDecoder]


DECODINGS = ("auto", "exact", "windowed")


def streaming_decoder(codec: torch.nn.Module, decoding: str = "auto",
                      stacks: CapturedStacks | None = None) -> AnyStreamingDecoder:
    """The decoder a stream should use. "auto": exact (carried LSTM state) for transformers' EnCodec, which is
    every MusicGen's codec, else windowed. "windowed" re-makes audio as streams decoded it before the exact
    decoder (a recording's replay compares against what it recorded); "exact" refuses a codec it cannot follow.
    `stacks`: the lane's traces of the exact decoder's convolutions (Engine.codec_stacks), or None (eager)."""
    if decoding not in DECODINGS:
        raise ValueError(f"decoding must be one of {', '.join(DECODINGS)}, got {decoding!r}")
    layout = ExactLayout.of(codec) if decoding != "windowed" else None
    if layout is None:
        return ExactStreamingDecoder(codec, stacks=stacks) if decoding == "exact" else StreamingDecoder(codec)
    return ExactStreamingDecoder(codec, layout, stacks)


def decoding_of(decoder: AnyStreamingDecoder) -> str:
    """"exact" or "windowed": what a stream's audio was made with (recordings say it)."""
    return "exact" if isinstance(decoder, ExactStreamingDecoder) else "windowed"


def push_together(decoders: list[AnyStreamingDecoder], codes: list[torch.Tensor]) -> list[torch.Tensor]:
    """`decoder.push(codes)` for several streams at once (streams that step together): the work of the same shape
    on the same codec runs in one batched call. Each stream gets what it would get pushing alone."""
    out: list[torch.Tensor] = [torch.zeros(0)] * len(decoders)
    exact = [i for i, d in enumerate(decoders) if isinstance(d, ExactStreamingDecoder)]
    windowed = [i for i, d in enumerate(decoders) if not isinstance(d, ExactStreamingDecoder)]
    for i in exact:
        decoders[i]._take(codes[i])
    for i, audio in zip(exact, _exact_round([decoders[i] for i in exact])):
        out[i] = audio
    for i, audio in zip(windowed, _windowed_round([decoders[i] for i in windowed], [codes[i] for i in windowed])):
        out[i] = audio
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
