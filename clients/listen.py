"""`musicrfm listen URL`: the speaker client. Joins a session over WebSocket (docs/protocol.md), plays its
audio through a sound card and reports what the server says.

The parts, each usable on its own:

- `LinearResampler`: stream rate -> device rate by linear interpolation, exact positions (integer
  arithmetic), so a stream resampled chunk by chunk equals the whole stream resampled at once.
- `JitterBuffer`: pure numpy, no I/O, not thread-safe (the caller locks). Audio frames go in with their
  stream position (`push(first_sample, pcm, epoch)`); the device callback takes exactly `n` samples out
  (`read(n)`). Output starts once `prebuffer` seconds are queued; running dry outputs silence, counts an
  underrun and waits for the prebuffer level again; missing stream samples become counted silence; more
  than `max_seconds` queued drops the oldest (counted).
- `AudioOutput`: where samples go. `SoundDeviceOutput` is a PortAudio stream (sounddevice, imported only
  when used); `FakeOutput` pulls blocks at real-time pace on a thread and keeps them (tests, `--no-audio`).
- `SpeakerClient`: the client tying them to a `protocol.connection.Connection`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, TextIO

import numpy as np

from musicrfm.protocol.connection import (Closed, ConnectError, Connection, describe_close, normalize_url,
                                         redact)
from musicrfm.protocol.wav import WavWriter
from musicrfm.protocol.wire import PROTOCOL_VERSION, ProtocolError, decode_message, is_audio_frame, unpack_audio

__all__ = [
    "ListenError",
    "AudioUnavailable",
    "LinearResampler",
    "BufferStats",
    "JitterBuffer",
    "AudioOutput",
    "FakeOutput",
    "SoundDeviceOutput",
    "list_devices",
    "ListenResult",
    "SpeakerClient",
]


class ListenError(RuntimeError):
    """An expected failure (unreachable server, refused handshake, no hello: the connection's `ConnectError`;
    no sound output): the text is the whole story."""


class AudioUnavailable(ListenError):
    """No sound output: PortAudio or sounddevice missing, or no usable device."""


# --- resampling and the jitter buffer ---------------------------------------------------------------


class LinearResampler:
    """Streaming linear-interpolation resampler with exact (rational) sample positions.

    Output sample k sits at input position k * in_rate / out_rate. The position of the next output is kept
    as an integer numerator (units of 1/up), so phase never drifts and chunk boundaries are invisible:
    `process(a) + process(b)` equals `process(a + b)`. One input sample is held back (interpolation needs the
    sample after the position).
    """

    def __init__(self, in_rate: int, out_rate: int):
        if in_rate <= 0 or out_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {in_rate} -> {out_rate}")
        g = math.gcd(int(in_rate), int(out_rate))
        self.in_rate, self.out_rate = int(in_rate), int(out_rate)
        self.up, self.down = self.out_rate // g, self.in_rate // g
        self.reset()

    def reset(self) -> None:
        self._carry = np.zeros(0, dtype=np.float32)
        self._pos = 0  # position of the next output relative to _carry[0], in units of 1/up input samples

    def process(self, x: np.ndarray) -> np.ndarray:
        buf = np.concatenate([self._carry, np.asarray(x, dtype=np.float32)]) if len(self._carry) else \
            np.asarray(x, dtype=np.float32)
        n = len(buf)
        # outputs at positions pos + j * down (/up) whose integer part i has i + 1 <= n - 1
        room = (n - 1) * self.up - 1 - self._pos
        count = room // self.down + 1 if room >= 0 else 0
        if count:
            nums = self._pos + self.down * np.arange(count, dtype=np.int64)
            i = nums // self.up
            frac = (nums % self.up).astype(np.float64) / self.up
            y = (buf[i] * (1.0 - frac) + buf[i + 1] * frac).astype(np.float32)
        else:
            y = np.zeros(0, dtype=np.float32)
        pos = self._pos + count * self.down
        drop = min(pos // self.up, n)
        self._carry = buf[drop:].copy()
        self._pos = pos - drop * self.up
        return y


@dataclass(frozen=True)
class BufferStats:
    """A snapshot of a `JitterBuffer`. Sample counts are in the output rate unless named `stream_`."""

    level_seconds: float
    playing: bool
    stream_samples: int  # stream samples received in frames (before gap filling)
    underruns: int  # times the buffer ran dry while playing (output went silent until rebuffered)
    gaps: int  # frames that started after the expected sample
    missing_stream_samples: int  # stream samples filled in with silence for those gaps
    overlaps: int  # frames that started before the expected sample (the repeated part is dropped)
    overflows: int  # pushes that found the buffer full
    dropped_samples: int  # oldest samples dropped by those
    stale_frames: int  # frames of an older epoch, dropped
    epoch_changes: int
    played_samples: int  # audio samples handed to the output
    silence_samples: int  # zeros handed to the output (prebuffering, underruns, drained)


class JitterBuffer:
    """Audio frames in, exactly `n` samples per device callback out. Pure numpy; not thread-safe.

    - `push(first_sample, pcm, epoch)`: stream position from the frame header. Samples are converted to the
      output rate on the way in (a `LinearResampler`, continuous across frames).
    - Output starts when `prebuffer` seconds are queued. Running dry while playing outputs what is left then
      silence, counts an underrun, and waits for the prebuffer level again before resuming.
    - A frame that starts after the expected sample: the missing samples are inserted as silence (counted),
      so the timeline stays true. One that starts before it: the repeated samples are dropped (counted).
    - A new epoch (the server's stream restarted): continuity tracking and the resampler restart; audio
      already queued (the end of the previous stream) still plays. A frame of an older epoch is dropped.
    - More than `max_seconds` queued: the oldest samples are dropped (counted).
    - `end_of_stream()`: no more audio is coming for now (pause, stop, disconnect): what is queued plays even
      below the prebuffer level, and running dry is not an underrun.
    """

    def __init__(self, stream_rate: int, output_rate: int | None = None, *, prebuffer: float = 0.2,
                 max_seconds: float = 2.0):
        output_rate = stream_rate if output_rate is None else output_rate
        if stream_rate <= 0 or output_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {stream_rate} -> {output_rate}")
        if not (0.0 <= prebuffer) or not (max_seconds > 0):
            raise ValueError(f"need prebuffer >= 0 and max_seconds > 0, got {prebuffer} and {max_seconds}")
        if prebuffer > max_seconds:
            raise ValueError(f"prebuffer ({prebuffer} s) cannot exceed the buffer's size max_seconds ({max_seconds} s)")
        self.stream_rate, self.output_rate = int(stream_rate), int(output_rate)
        self.prebuffer, self.max_seconds = float(prebuffer), float(max_seconds)
        self._prebuffer_n = max(1, round(prebuffer * self.output_rate))
        self._cap = max(self._prebuffer_n, math.ceil(max_seconds * self.output_rate))
        self._ring = np.zeros(self._cap, dtype=np.float32)
        self._read_at = 0
        self._level = 0
        self._resampler = LinearResampler(self.stream_rate, self.output_rate) \
            if self.output_rate != self.stream_rate else None
        self._epoch: int | None = None
        self._expected: int | None = None  # next stream sample index expected in this epoch
        self._playing = False
        self._ended = False
        self._c = dict(stream_samples=0, underruns=0, gaps=0, missing_stream_samples=0, overlaps=0, overflows=0,
                       dropped_samples=0, stale_frames=0, epoch_changes=0, played_samples=0, silence_samples=0)

    # -- state

    @property
    def level(self) -> int:
        """Output-rate samples queued."""
        return self._level

    @property
    def level_seconds(self) -> float:
        return self._level / self.output_rate

    @property
    def playing(self) -> bool:
        return self._playing

    @property
    def epoch(self) -> int | None:
        return self._epoch

    def expected_sample(self, epoch: int) -> int | None:
        """The stream sample the next frame of `epoch` should start at (None: any start is fine)."""
        return self._expected if self._epoch == epoch else None

    def stats(self) -> BufferStats:
        return BufferStats(level_seconds=self.level_seconds, playing=self._playing, **self._c)

    # -- input

    def push(self, first_sample: int, pcm: np.ndarray, epoch: int = 0) -> np.ndarray:
        """Queue one frame's samples. Returns the stream-rate samples accepted (with any gap silence in front,
        without repeated samples): what a recording of the stream should append."""
        pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
        first_sample, epoch = int(first_sample), int(epoch)
        if self._epoch is not None and epoch < self._epoch:
            self._c["stale_frames"] += 1
            return pcm[:0]
        if self._epoch is not None and epoch > self._epoch:
            self._c["epoch_changes"] += 1
            self._expected = None
            if self._resampler is not None:
                self._resampler.reset()
        self._epoch = epoch
        self._c["stream_samples"] += len(pcm)
        if len(pcm) == 0:
            return pcm
        end = first_sample + len(pcm)
        if self._expected is None:
            self._expected = first_sample
        if first_sample > self._expected:
            missing = first_sample - self._expected
            self._c["gaps"] += 1
            self._c["missing_stream_samples"] += missing
            # more silence than the buffer holds would only be dropped again
            fill = min(missing, math.ceil(self.max_seconds * self.stream_rate))
            pcm = np.concatenate([np.zeros(fill, dtype=np.float32), pcm])
        elif first_sample < self._expected:
            self._c["overlaps"] += 1
            pcm = pcm[self._expected - first_sample:]
        self._expected = max(self._expected, end)
        if len(pcm):
            self._write(self._resampler.process(pcm) if self._resampler is not None else pcm)
            self._ended = False
        return pcm

    def end_of_stream(self) -> None:
        """No more audio for now: play out what is queued, and do not count running dry as an underrun."""
        self._ended = True

    def _write(self, y: np.ndarray) -> None:
        n = len(y)
        if n == 0:
            return
        if n > self._cap:
            self._c["overflows"] += 1
            self._c["dropped_samples"] += self._level + n - self._cap
            y, n = y[-self._cap:], self._cap
            self._read_at, self._level = 0, 0
        excess = self._level + n - self._cap
        if excess > 0:
            self._c["overflows"] += 1
            self._c["dropped_samples"] += excess
            self._read_at = (self._read_at + excess) % self._cap
            self._level -= excess
        start = (self._read_at + self._level) % self._cap
        head = min(n, self._cap - start)
        self._ring[start:start + head] = y[:head]
        self._ring[:n - head] = y[head:]
        self._level += n

    # -- output

    def read(self, n: int) -> np.ndarray:
        out = np.empty(int(n), dtype=np.float32)
        self.read_into(out)
        return out

    def read_into(self, out: np.ndarray) -> None:
        """Fill `out` (1-D float32, any length) with the next samples or silence."""
        n = len(out)
        if not self._playing:
            if self._level >= self._prebuffer_n or (self._ended and self._level > 0):
                self._playing = True
            else:
                out[:] = 0.0
                self._c["silence_samples"] += n
                return
        take = min(n, self._level)
        head = min(take, self._cap - self._read_at)
        out[:head] = self._ring[self._read_at:self._read_at + head]
        out[head:take] = self._ring[:take - head]
        self._read_at = (self._read_at + take) % self._cap
        self._level -= take
        self._c["played_samples"] += take
        if take < n:
            out[take:] = 0.0
            self._c["silence_samples"] += n - take
            if not self._ended:
                self._c["underruns"] += 1
            self._playing = False
        elif self._level == 0 and self._ended:
            self._playing = False


# --- outputs ----------------------------------------------------------------------------------------

Pull = Callable[[np.ndarray], None]  # fills a float32 block with the next samples


class AudioOutput(Protocol):
    """Where the samples go. `open` learns the stream's rate and answers the rate it will pull at (the
    jitter buffer resamples to it); `start` begins calling `pull` from its own thread; `stop` ends that."""

    def open(self, stream_rate: int) -> int: ...

    def start(self, pull: Pull) -> None: ...

    def stop(self) -> None: ...

    def describe(self) -> str: ...


class FakeOutput:
    """A sound card without sound: a thread pulls `blocksize` samples every `blocksize / rate` seconds (real
    time, times `speed`) and keeps them (`keep=False` throws them away: `--no-audio`)."""

    def __init__(self, rate: int | None = None, *, blocksize: int = 512, speed: float = 1.0, keep: bool = True):
        if blocksize <= 0 or speed <= 0:
            raise ValueError("blocksize and speed must be positive")
        self.rate = rate
        self.blocksize, self.speed, self.keep = int(blocksize), float(speed), keep
        self.blocks: list[np.ndarray] = []
        self.pulled = 0  # samples pulled
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def open(self, stream_rate: int) -> int:
        if self.rate is None:
            self.rate = int(stream_rate)
        return self.rate

    def describe(self) -> str:
        return f"no sound device ({'fake, keeping audio' if self.keep else 'audio discarded'}), {self.rate} Hz"

    def start(self, pull: Pull) -> None:
        if self.rate is None:
            raise RuntimeError("FakeOutput.start before open")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(pull,), name="fake-audio-output", daemon=True)
        self._thread.start()

    def _run(self, pull: Pull) -> None:
        period = self.blocksize / self.rate / self.speed
        due = time.monotonic()
        while not self._stop.is_set():
            wait = due - time.monotonic()
            if wait > 0 and self._stop.wait(wait):
                break
            block = np.empty(self.blocksize, dtype=np.float32)
            pull(block)
            self.pulled += self.blocksize
            if self.keep:
                self.blocks.append(block)
            due += period
            if time.monotonic() - due > 1.0:  # the thread was starved for a long time: do not burst
                due = time.monotonic()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def audio(self) -> np.ndarray:
        """Everything pulled so far, in order."""
        return np.concatenate(self.blocks) if self.blocks else np.zeros(0, dtype=np.float32)


def _import_sounddevice():
    try:
        import sounddevice
    except OSError as exc:  # sounddevice raises OSError("PortAudio library not found") at import
        raise AudioUnavailable(
            f"sound output needs the PortAudio library ({exc}); on Debian/Ubuntu: sudo apt-get install "
            "libportaudio2 (or listen without a sound card: --no-audio --out FILE.wav)") from None
    except ImportError:
        raise AudioUnavailable("sound output needs the sounddevice package: pip install sounddevice "
                               "(or listen without a sound card: --no-audio --out FILE.wav)") from None
    return sounddevice


def list_devices() -> str:
    """PortAudio's devices as sounddevice prints them (`>` marks the default output)."""
    sd = _import_sounddevice()
    devices = sd.query_devices()
    return str(devices) if len(devices) else "PortAudio lists no audio devices"


def _device_arg(device: str | int | None) -> str | int | None:
    if isinstance(device, str) and device.strip().lstrip("-").isdigit():
        return int(device)
    return device


class SoundDeviceOutput:
    """A PortAudio output stream (sounddevice), mono float32; its callback pulls from the jitter buffer.

    `device`: index or (part of a) name, as `--list-devices` shows; default: PortAudio's default output.
    `rate`: the device rate; default: the stream's rate if the device takes it, else the device's own
    default rate (the jitter buffer resamples). `latency`: PortAudio's 'low', 'high' or seconds.
    """

    def __init__(self, device: str | int | None = None, *, rate: int | None = None, blocksize: int = 0,
                 latency: str | float = "high"):
        self.device = _device_arg(device)
        self.rate = rate
        self.blocksize = blocksize
        self.latency = latency
        self.device_underflows = 0  # PortAudio's own output underflow flags (callback too late)
        self.callbacks = 0
        self.frames = 0
        self.nonzero_frames = 0
        self._stream = None
        self._name = "?"

    def open(self, stream_rate: int) -> int:
        sd = _import_sounddevice()
        try:
            info = sd.query_devices(self.device, kind="output")
        except (ValueError, sd.PortAudioError) as exc:
            count = len(sd.query_devices())
            hint = "PortAudio lists no audio devices" if count == 0 else "see musicrfm listen --list-devices"
            which = "the default output device" if self.device is None else f"output device {self.device!r}"
            raise AudioUnavailable(f"cannot use {which}: {exc} ({hint}; or --no-audio)") from None
        self._name = info["name"]
        if self.device is None:
            self.device = info["index"]
        if self.rate is None:
            try:
                sd.check_output_settings(device=self.device, samplerate=stream_rate, channels=1, dtype="float32")
                self.rate = int(stream_rate)
            except (ValueError, sd.PortAudioError):
                self.rate = int(round(info["default_samplerate"]))
        return self.rate

    def describe(self) -> str:
        return f"{self._name}, {self.rate} Hz"

    def start(self, pull: Pull) -> None:
        sd = _import_sounddevice()

        def callback(outdata, frames, time_info, status):
            self.callbacks += 1
            if status.output_underflow:
                self.device_underflows += 1
            block = outdata[:, 0]
            try:
                pull(block)
            except Exception:  # never let an exception kill the audio thread; silence instead
                block[:] = 0.0
            self.frames += frames
            if block.any():
                self.nonzero_frames += frames

        try:
            self._stream = sd.OutputStream(samplerate=self.rate, channels=1, dtype="float32", device=self.device,
                                           blocksize=self.blocksize, latency=self.latency, callback=callback)
            self._stream.start()
        except (ValueError, sd.PortAudioError) as exc:
            self._stream = None
            raise AudioUnavailable(f"cannot open output device {self._name!r} at {self.rate} Hz: {exc} "
                                   "(see musicrfm listen --list-devices; --output-rate picks another rate)") from None

    def stop(self) -> None:
        if self._stream is not None:
            try:
                self._stream.stop()
                self._stream.close()
            finally:
                self._stream = None


# --- the client -------------------------------------------------------------------------------------


@dataclass
class ListenResult:
    url: str
    hello: dict | None = None
    stream_seconds: float = 0.0  # audio received (stream samples / rate)
    stats: BufferStats | None = None
    close_code: int | None = None
    close_reason: str = ""
    closed_by: str = ""  # "client" or "server"
    errors: list[str] = dataclasses.field(default_factory=list)  # the server's `error` messages
    warnings: list[str] = dataclasses.field(default_factory=list)  # the server's `warning` messages
    audio: np.ndarray | None = None  # the received stream (stream rate), with keep_audio=True
    output_rate: int | None = None

    @property
    def clean(self) -> bool:
        """Ended by us, or by the server with a normal close (1000 / 1001)."""
        return self.closed_by == "client" or self.close_code in (1000, 1001)


class _Console:
    """Messages to stdout / stderr and a status line on stderr (redrawn in place on a terminal)."""

    def __init__(self, out: TextIO | None = None, err: TextIO | None = None, status: bool = True,
                 interval: float | None = None):
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.tty = hasattr(self.err, "isatty") and self.err.isatty()
        self.status_enabled = status
        self.interval = interval if interval is not None else (0.25 if self.tty else 5.0)
        self._shown = False

    def _clear(self) -> None:
        if self._shown:
            self.err.write("\r\x1b[K")
            self.err.flush()
            self._shown = False

    def info(self, text: str) -> None:
        self._clear()
        print(text, file=self.out, flush=True)

    def warn(self, text: str) -> None:
        self._clear()
        print(text, file=self.err, flush=True)

    def status(self, text: str) -> None:
        if not self.status_enabled:
            return
        if self.tty:
            self.err.write("\r" + text + "\x1b[K")
            self.err.flush()
            self._shown = True
        else:
            print(text, file=self.err, flush=True)

    def done(self) -> None:
        self._clear()


class SpeakerClient:
    """The speaker client (`musicrfm listen`): one `Connection`, its audio into a jitter buffer that the
    output drains. (Not to be confused with the server's `Listener`, anything a session sends to.)

    `output`: an `AudioOutput` (opened once the hello tells the stream's rate). `seconds`: stop after that
    much audio has been received, then let the output play out what is queued. `play`: send `play` after the
    hello. `out`: also write the received stream to a WAV file. `handle_sigint`: Ctrl-C closes cleanly (code
    1000) instead of raising (main thread only).
    """

    def __init__(self, url: str, output: AudioOutput, *, session: str | None = None, token: str | None = None,
                 prebuffer: float = 0.2, max_seconds: float = 2.0, play: bool = False, out: str | Path | None = None,
                 seconds: float | None = None, keep_audio: bool = False, console: _Console | None = None,
                 handle_sigint: bool = False, hello_timeout: float = 10.0, open_timeout: float = 10.0):
        self.url = normalize_url(url, session=session, token=token)
        self.output = output
        if not 0 <= prebuffer <= max_seconds:
            raise ValueError(f"prebuffer ({prebuffer} s) must be >= 0 and at most the buffer size ({max_seconds} s)")
        self.prebuffer, self.max_seconds = prebuffer, max_seconds
        if seconds is not None and not seconds > 0:
            raise ValueError(f"--seconds must be positive, got {seconds}")
        self.play, self.seconds = play, seconds
        self.out = Path(out) if out is not None else None
        self.keep_audio = keep_audio
        self.console = console or _Console()
        self.handle_sigint = handle_sigint
        self.hello_timeout, self.open_timeout = hello_timeout, open_timeout
        self._lock = threading.Lock()
        self._buffer: JitterBuffer | None = None
        self._stop = asyncio.Event()
        self._stop_cause = ""
        self._server_stats: dict = {}
        self._playback = "?"
        self._kept: list[np.ndarray] = []
        self._sink: WavWriter | None = None
        self._received = 0
        self._rate = 0
        self._bad_frames = 0
        self._warned_rate = False
        self._main: asyncio.Task | None = None

    # -- helpers

    def _pull(self, block: np.ndarray) -> None:
        with self._lock:
            self._buffer.read_into(block)

    def stop(self, cause: str = "stopped") -> None:
        """Ask `run` to close the connection (thread-unsafe; call from the event loop)."""
        self._stop_cause = self._stop_cause or cause
        self._stop.set()

    def _status_line(self) -> str:
        with self._lock:
            s = self._buffer.stats() if self._buffer else None
        if s is None:
            return "waiting for the server"
        parts = [self._playback, f"buffer {s.level_seconds:4.2f} s",
                 f"received {self._received / self._rate:6.1f} s", f"underruns {s.underruns}"]
        if s.gaps:
            parts.append(f"gaps {s.gaps}")
        if s.overflows:
            parts.append(f"dropped {s.dropped_samples / self._buffer.output_rate:.2f} s")
        st = self._server_stats
        if st:
            parts.append(f"server: lead {st.get('lead_seconds', float('nan')):.2f} s, "
                         f"{st.get('realtime_factor', float('nan')):.2f}x real time")
        return " | ".join(parts)

    # -- the connection

    async def run(self) -> ListenResult:
        result = ListenResult(url=redact(self.url))
        loop = asyncio.get_running_loop()
        self._main = asyncio.current_task()
        sigint = False
        if self.handle_sigint and threading.current_thread() is threading.main_thread():
            try:
                loop.add_signal_handler(signal.SIGINT, self._on_sigint)
                sigint = True
            except (NotImplementedError, RuntimeError):
                pass
        try:
            try:
                conn = await Connection.open(self.url, open_timeout=self.open_timeout, hello_timeout=self.hello_timeout)
            except ConnectError as exc:
                raise ListenError(str(exc)) from None
            except asyncio.CancelledError:
                if self._stop_cause != "interrupted":
                    raise
                raise KeyboardInterrupt from None  # Ctrl-C while connecting or waiting for the hello
            try:
                await self._session(conn, result)
            except Closed:
                pass
            except asyncio.CancelledError:
                if self._stop_cause != "interrupted":
                    raise
                raise KeyboardInterrupt from None  # Ctrl-C before the stream started
            finally:
                if conn.close_code is None:
                    await conn.close()
                    result.closed_by = result.closed_by or "client"
                result.close_code, result.close_reason = conn.close_code, conn.close_reason
        finally:
            if sigint:
                loop.remove_signal_handler(signal.SIGINT)
            self._finish(result)
        return result

    def _on_sigint(self) -> None:
        self.console.warn("stopping (Ctrl-C again to quit at once)")
        self.stop("interrupted")
        if self._buffer is None and self._main is not None:
            self._main.cancel()  # still connecting or waiting for the hello: give up on that now
        try:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGINT)
        except Exception:  # pragma: no cover
            pass

    async def _session(self, conn: Connection, result: ListenResult) -> None:
        hello = conn.hello
        result.hello = hello
        if hello.get("protocol") != PROTOCOL_VERSION:
            self.console.warn(f"warning: the server speaks protocol {hello.get('protocol')!r}, this client "
                              f"{PROTOCOL_VERSION}; carrying on")
        self._rate = int(hello["sample_rate"])
        if hello.get("channels", 1) != 1:
            raise ListenError(f"the server sends {hello.get('channels')} channels; this client plays mono only")
        self._playback = (hello.get("state") or {}).get("playback", "?")
        model = hello.get("model", "?")
        self.console.info(f"session {hello.get('session', '?')!r} at {result.url}: model {model}, "
                          f"{self._rate} Hz mono, epoch {hello.get('epoch')}, step {hello.get('step')}, "
                          f"{self._playback}")
        if hello.get("random_weights") and hello.get("note"):
            self.console.info(hello["note"])  # the server's own words: random weights make noise, not music
        out_rate = int(self.output.open(self._rate))
        result.output_rate = out_rate
        self._buffer = JitterBuffer(self._rate, out_rate, prebuffer=self.prebuffer, max_seconds=self.max_seconds)
        if self.out is not None:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self._sink = WavWriter(self.out, self._rate)
        resample = f", resampled {self._rate} -> {out_rate} Hz" if out_rate != self._rate else ""
        self.console.info(f"output: {self.output.describe()}{resample}; prebuffer {self.prebuffer:g} s")
        self.output.start(self._pull)
        if self.play:
            await conn.send({"type": "transport", "command": "play", "id": "listen-play"})
        elif self._playback != "playing":
            self.console.info(f"the session is {self._playback}: nothing plays until a client sends play "
                              "(or listen with --play)")

        receiver = asyncio.create_task(self._receive(conn, result))
        status = asyncio.create_task(self._status_loop())
        stopper = asyncio.create_task(self._stop.wait())
        try:
            done, _ = await asyncio.wait({receiver, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (stopper, status):
                task.cancel()
        if self._stop.is_set():  # --seconds reached, Ctrl-C or stop(): we close
            receiver.cancel()
            result.closed_by = "client"
            await conn.close()
            if self._stop_cause == "seconds":
                await self._drain()
        else:
            exc = receiver.exception()
            if exc is not None:
                raise exc
            result.closed_by = "server"
            self.console.warn(f"the server closed the connection: {describe_close(conn.close_code, conn.close_reason)}")
            await self._drain()

    async def _drain(self) -> None:
        """Let the output play what is queued (bounded by its length plus a second)."""
        with self._lock:
            self._buffer.end_of_stream()
            left = self._buffer.level_seconds
        deadline = time.monotonic() + left + 1.0
        while time.monotonic() < deadline:
            with self._lock:
                if self._buffer.level == 0:
                    break
            await asyncio.sleep(0.02)

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(self.console.interval)
            self.console.status(self._status_line())

    async def _receive(self, conn: Connection, result: ListenResult) -> None:
        """Frames until the connection ends (a bad frame is dropped with a warning, not the connection)."""
        while True:
            try:
                frame = await conn.recv_frame()
            except Closed:
                return
            if is_audio_frame(frame):
                self._on_audio(frame)
                if self._stop.is_set():
                    return
                continue
            try:
                message = decode_message(frame)
            except ProtocolError as exc:
                self.console.warn(f"warning: ignored a malformed message from the server: {exc}")
                continue
            self._on_message(message, result)

    def _on_audio(self, frame: bytes) -> None:
        try:
            header, pcm = unpack_audio(frame)
        except ProtocolError as exc:
            self._bad_frames += 1
            if self._bad_frames == 1:
                self.console.warn(f"warning: dropped a bad audio frame: {exc}")
            return
        if header.sample_rate != self._rate:
            if not self._warned_rate:
                self._warned_rate = True
                self.console.warn(f"warning: audio at {header.sample_rate} Hz on a {self._rate} Hz stream: dropped")
            return
        with self._lock:
            if self.seconds is not None:  # the stream time covered (gaps included) stops at exactly `seconds`
                room = round(self.seconds * self._rate) - self._received
                expected = self._buffer.expected_sample(header.epoch)
                start = header.first_sample if expected is None else max(header.first_sample, expected)
                gap = start - expected if expected is not None else 0
                if room - gap <= 0:
                    self.stop("seconds")
                    return
                pcm = pcm[:start - header.first_sample + room - gap]
            accepted = self._buffer.push(header.first_sample, pcm, header.epoch)
        self._received += len(accepted)
        if self._sink is not None:
            self._sink.write(accepted)
        if self.keep_audio:
            self._kept.append(accepted)
        if self.seconds is not None and self._received >= round(self.seconds * self._rate):
            self.stop("seconds")

    def _on_message(self, message: dict, result: ListenResult) -> None:
        kind = message["type"]
        if kind == "state":
            playback = (message.get("state") or {}).get("playback", self._playback)
            if playback != self._playback:
                self._playback = playback
                self.console.info(f"{playback} (epoch {message.get('epoch')}, step {message.get('step')})")
                if playback in ("paused", "stopped") and self._buffer is not None:
                    with self._lock:
                        self._buffer.end_of_stream()
        elif kind == "stats":
            self._server_stats = message
        elif kind == "warning":
            text = str(message.get("message", message))
            result.warnings.append(text)
            self.console.warn(f"server warning: {text}")
        elif kind == "error":
            text = str(message.get("message", message))
            result.errors.append(text)
            self.console.warn(f"server error: {text}")
        elif kind == "recording":
            self.console.info(f"recording {message.get('status')}: {message.get('wav', '')}")
        # hello again, or types this client does not know: nothing to do

    def _finish(self, result: ListenResult) -> None:
        try:
            self.output.stop()
        finally:
            if self._sink is not None:
                self._sink.close()
            self.console.done()
        if self._buffer is not None:
            with self._lock:
                result.stats = self._buffer.stats()
        result.stream_seconds = self._received / self._rate if self._rate else 0.0
        if self.keep_audio:
            result.audio = np.concatenate(self._kept) if self._kept else np.zeros(0, dtype=np.float32)

