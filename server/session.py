"""A live session: one `Stream` paced against a real-time clock, its listeners, its recording.

All of a session's bookkeeping runs on the event loop; the model work (`Stream.generate`, and applying
changes, which may encode a prompt) runs on the device's thread (server/scheduler.py), so the loop never
blocks, and the sessions that need audio at the same time step together in one batched forward.

Nobody listening: a playing session whose last WebSocket listener left holds generation (its playback stays
`playing`, its clock stops) until a listener joins, which goes on with the same stream: a session does not spend
the CPU, or fill a recording, for nobody. Changes still apply (between steps) while it waits.

Pacing: the server's playback clock runs at real time from the moment a stream starts playing. The
session generates a chunk whenever less than `lead_seconds` of audio is ahead of that clock, and sleeps
otherwise. When generation cannot keep up, the clock catches the generated audio (an underrun: the
listeners' buffers ran dry); the session counts it, warns once, and carries on.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Protocol


from musicrfm.protocol import fields
from musicrfm.protocol.wire import AudioHeader, ProtocolError, SharedMessage, pack_audio
from .limits import TokenBucket
from .recording import Recorder
from .scheduler import DeviceScheduler
from .stream import Applied, Cause, Stream, StreamChunk

log = logging.getLogger("musicrfm.session")
__all__ = ["Cause", "Session", "SessionConfig", "Listener"]

# How often a session's recordings may start: a burst of this many, then one per RECORD_START_SECONDS. Each start
# creates two files; unbounded, ten OSC datagrams of /record 1 /record 0 created 2,000 of them.
RECORD_START_BURST = 3
RECORD_START_SECONDS = 10.0


@dataclass(frozen=True)
class SessionConfig:
    chunk_steps: int = 5  # steps per generate call (100 ms at 50 steps/s): the granularity of pacing
    lead_seconds: float = 0.5  # generated-but-unplayed audio to keep ahead of the real-time clock
    record_dir: Path = Path("recordings")
    stats_interval: float = 1.0
    record_max_seconds: float = 3600.0  # a recording stops (complete) at this length ...
    record_max_mb: float = 1024.0  # ... or when its WAV and log reach this size (MB, 10**6 bytes)
    record_min_free_mb: float = 512.0  # a recording does not start when the disk has less free than this

    def __post_init__(self) -> None:
        for name in ("record_max_seconds", "record_max_mb"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not self.record_min_free_mb >= 0:
            raise ValueError(f"record_min_free_mb must be >= 0, got {self.record_min_free_mb!r}")
        if not isinstance(self.chunk_steps, int) or self.chunk_steps < 1:
            raise ValueError(f"chunk_steps must be an integer >= 1, got {self.chunk_steps!r}")
        if not 0 < self.lead_seconds <= 30:
            raise ValueError(f"lead_seconds must be in (0, 30], got {self.lead_seconds}")


class Listener(Protocol):
    """A client that hears the session: the WebSocket connection implements this. Sending only queues (it
    never waits for the client); a listener that raises is dropped (`drop`), and the session plays on."""

    client_id: int

    def send_audio(self, frame: bytes, samples: int) -> None: ...

    def send_message(self, message: dict) -> None: ...

    def drop(self, reason: str) -> None:
        """Stop sending to this client and close it, saying `reason`. Must not raise."""
        ...


class _Clock:
    """The real-time playback position of a stream, in samples."""

    def __init__(self, sample_rate: int):
        self.sample_rate = sample_rate
        self.reset()

    def reset(self) -> None:
        self._anchor_time: float | None = None  # None: not running (stopped / paused / nothing yet)
        self.anchor = 0  # the sample playing at _anchor_time (or where playback is held)

    def start(self, at_sample: int) -> None:
        self._anchor_time, self.anchor = time.monotonic(), at_sample

    def pause(self, generated: int) -> None:
        self.anchor = self.position(generated)
        self._anchor_time = None

    def position(self, generated: int) -> int:
        if self._anchor_time is None:
            return min(self.anchor, generated)
        return self.anchor + int((time.monotonic() - self._anchor_time) * self.sample_rate)

    @property
    def running(self) -> bool:
        return self._anchor_time is not None


class Session:
    def __init__(self, name: str, stream: Stream, config: SessionConfig, bank_paths: list[Path],
                 scheduler: DeviceScheduler | None = None):
        """`scheduler`: the device's, shared with the other sessions (the server's); None: one of its own."""
        self.name = name
        self.stream = stream
        stream.pace_prompts = True  # live: a flood of prompts is encoded within PROMPT_ENCODE_SHARE of the time
        self.config = config
        self.bank_paths = bank_paths
        self.sample_rate = stream.model.sample_rate
        self._listeners: dict[int, Listener] = {}
        self._subscribers: list[Callable[[dict], None]] = []
        self._recorder: Recorder | None = None
        self._armed = False  # `record start` while stopped: record the next stream from its first frame
        self._record_requests: list[tuple[str, Cause]] = []
        self._clock = _Clock(self.sample_rate)
        self._wake = asyncio.Event()
        self._own_scheduler = scheduler is None
        self._scheduler = scheduler or DeviceScheduler(stream.model.frame_rate, name=f"session-{name}")
        self._task: asyncio.Task | None = None
        self._closed = False
        self.last_active = time.monotonic()  # the last client message, OSC packet, join or leave (idle reaping)
        self._record_starts = TokenBucket(1.0 / RECORD_START_SECONDS, RECORD_START_BURST)
        self.last_applied: Applied | None = None
        self._was_held = True
        # stats
        self.underruns = 0
        self._behind_warned = False
        self._work_seconds = 0.0
        self._work_samples = 0
        self._last_stats = 0.0

    # --- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"session {self.name}")

    async def close(self) -> None:
        """Stop generating, finalise a recording, release the worker."""
        self._closed = True
        self._wake.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        if self._recorder is not None:
            self._finish_recording()
        await self._scheduler.run(self.stream, self.stream.close)  # the stream's place on the device goes back
        self._scheduler.release(self.stream)
        if self._own_scheduler:
            self._scheduler.close()

    # --- clients ------------------------------------------------------------------------------------

    def add_listener(self, listener: Listener) -> None:
        self._listeners[listener.client_id] = listener
        self.touch()
        self._wake.set()  # a session held for want of listeners goes on

    def remove_listener(self, listener: Listener) -> None:
        self._listeners.pop(listener.client_id, None)
        self.touch()

    def touch(self) -> None:
        """Someone used the session now (it is not idle)."""
        self.last_active = time.monotonic()

    def idle_for(self) -> float:
        """Seconds since anybody used the session; 0 while a listener is connected."""
        return 0.0 if self._listeners else time.monotonic() - self.last_active

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def listeners(self) -> int:
        return len(self._listeners)

    def subscribe(self, callback: Callable[[dict], None]) -> Callable[[], None]:
        """callback(message) for every control message the session sends (state, stats, warning, recording)."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback) if callback in self._subscribers else None

    def _deliver(self, listener: Listener, send: Callable[..., None], *args) -> None:
        """One listener's share of what the session sends. Whatever goes wrong with one client (a message its
        encoding cannot carry, a broken connection) is that client's problem: it is dropped, and the session
        loop, and everybody else's audio, go on."""
        try:
            send(*args)
        except Exception as exc:
            log.exception("session %s: sending to client %s failed: dropping it", self.name, listener.client_id)
            self.remove_listener(listener)
            try:
                listener.drop(f"internal error: a message could not be sent ({type(exc).__name__})")
            except Exception:
                log.exception("session %s: closing client %s failed", self.name, listener.client_id)

    def _broadcast(self, message: dict) -> None:
        message = SharedMessage(message)  # encoded once per wire format, not once per listener
        for listener in list(self._listeners.values()):
            self._deliver(listener, listener.send_message, message)
        for callback in list(self._subscribers):
            try:
                callback(message)
            except Exception:  # a subscriber's bug must not stop the stream
                log.exception("session %s: subscriber failed", self.name)

    def state_message(self, applied: Applied | None = None) -> dict:
        """The `state` message of one applied change (echoed in order, so each carries its own state), or,
        without one, of the session now (with the cause of the latest change if nothing came after it)."""
        if applied is None and self.last_applied is not None and self.last_applied.version == self.stream.version:
            applied = self.last_applied
        if applied is not None:
            version, epoch, step = applied.version, applied.epoch, applied.step
            state, cause = applied.state, applied.cause.to_dict()
        else:
            s = self.stream
            version, epoch, step, state, cause = s.version, s.epoch, s.step, s.state, None
        return {"type": "state", "version": version, "epoch": max(epoch, 0), "step": step,
                "state": state.to_dict(), "cause": cause, "recording": self.recording_status()}

    def recording_status(self) -> dict:
        """What a client joining now needs to show the record button right."""
        if self._recorder is not None:
            return {"status": "recording", "wav": str(self._recorder.wav_path), "log": str(self._recorder.log_path)}
        return {"status": "armed" if self._armed else "off"}

    # --- control ------------------------------------------------------------------------------------

    async def handle(self, message: dict, cause: Cause) -> None:
        """A client's message (already decoded). Raises ProtocolError naming what is wrong."""
        if self._closed:
            raise ProtocolError(f"session {self.name!r} is closing")
        self.touch()
        kind = message.get("type")
        if kind in ("set", "transport"):
            self.stream.submit(message, cause)
            if kind == "transport" and message["command"] in ("stop", "play", "reset"):
                self._scheduler.set_active(self.stream, message["command"] != "stop")
            self._wake.set()
        elif kind == "record":
            extra = [k for k in message if k not in ("type", "id", "command")]
            if extra:
                raise ProtocolError(f"record: unknown field {fields.shown(extra[0])}")
            command = message.get("command")
            if command not in ("start", "stop"):
                raise ProtocolError(f"record command must be start or stop, got {fields.shown(command)}")
            if command == "start" and (self._record_requests or not (self._recorder or self._armed)):
                self._check_can_record()  # (a start while recording, with nothing else waiting, does nothing)
            self._record_requests.append((command, cause))
            self._wake.set()
        elif kind == "get":
            return None
        else:
            raise ProtocolError(f"unknown message type {fields.shown(kind)}; expected set, transport, record or get")

    # --- the loop -----------------------------------------------------------------------------------

    def _generated(self) -> int:
        return self.stream.samples_emitted

    def lead_seconds(self) -> float:
        return (self._generated() - self._clock.position(self._generated())) / self.sample_rate

    async def _work(self, fn, *args):
        return await self._scheduler.run(self.stream, fn, *args)

    @property
    def held(self) -> bool:
        """No step runs now: the stream is not playing, or nobody listens (module docstring)."""
        return self.stream.state.playback != "playing" or not self._listeners

    async def _run(self) -> None:
        try:
            while not self._closed:
                self._wake.clear()
                if self.held:  # while generating, generate() applies changes
                    self._publish(await self._work(self.stream.apply_due))
                await self._handle_record_requests()
                if self.held:
                    if self._clock.running:
                        self._clock.pause(self._generated())
                    self._was_held = True
                    await self._idle(None)
                    continue
                if self._was_held:  # it starts (or goes on) playing: is there room for it on the device?
                    self._was_held = False
                    self._check_room()
                if not self._clock.running and self._generated() > self._clock.anchor:
                    # Playback (re)starts once there is audio to play: at a stream's first chunk, or on resume.
                    self._clock.start(self._clock.anchor)
                lead = self.lead_seconds()
                if lead < 0:  # the clock overtook the audio: listeners ran dry
                    self._underrun()
                    lead = 0.0
                if lead >= self.config.lead_seconds:
                    await self._idle(lead - self.config.lead_seconds + 0.002)
                    continue
                chunk = await self._scheduler.generate(self.stream, self.config.chunk_steps)
                self._publish(chunk)
                self._stats()
        except Exception:
            log.exception("session %s: generation failed", self.name)
            self._broadcast({"type": "warning", "message": "generation failed on the server; the session stopped "
                                                           "(see the server log)"})

    async def _idle(self, seconds: float | None) -> None:
        try:
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)
        except asyncio.TimeoutError:
            pass

    def _underrun(self) -> None:
        self.underruns += 1
        self._clock.start(self._generated())  # playback resumes where the audio is
        factor = self.realtime_factor
        if not self._behind_warned and factor is not None and factor < 1.0:
            self._behind_warned = True
            text = f"generation is slower than real time ({factor:.2f}x): audio will stutter"
            log.warning("session %s: %s", self.name, text)
            self._broadcast({"type": "warning", "message": text})

    def _check_room(self) -> None:
        """Warn this session's listeners when the device, by what its batches measured, holds fewer streams at
        real time than would now be playing: the audio of every session on it may stutter."""
        room = self._scheduler.capacity()
        playing = self._scheduler.active_streams(besides=self.stream) + 1
        if room is not None and playing > room:
            text = (f"this device keeps about {room} stream{'s' if room != 1 else ''} at real time (measured); with "
                    f"this one {playing} are playing, so every session's audio may stutter")
            log.warning("session %s: %s", self.name, text)
            self._broadcast({"type": "warning", "message": text})

    @property
    def realtime_factor(self) -> float | None:
        if self._work_seconds <= 0:
            return None
        return self._work_samples / self.sample_rate / self._work_seconds

    def _publish(self, chunk: StreamChunk) -> None:
        # A change's `state` goes out before the audio it shaped, so a client knows the step before the
        # samples arrive; but a stream's end goes out after its last audio (the decoder's tail), so a
        # client that sees "stopped" knows nothing more of that stream is coming.
        if not chunk.ended:
            self._publish_states(chunk.applied)
        n = int(chunk.audio.shape[0])
        if n:
            self._work_seconds += chunk.seconds
            self._work_samples += n
            header = AudioHeader(chunk.version, self.sample_rate, chunk.first_sample, chunk.steps[0],
                                 chunk.steps[1], max(chunk.epoch, 0), n)
            frame = pack_audio(header, chunk.audio)
            for listener in list(self._listeners.values()):
                self._deliver(listener, listener.send_audio, frame, n)
            if self._recorder is not None and self._recorder.epoch == chunk.epoch:
                self._recorder.add_audio(chunk.first_sample, chunk.audio,
                                         int(self.config.record_max_seconds * self.sample_rate))
                if self._recorder.full:
                    log.info("session %s: the recording reached --record-max-seconds or --record-max-mb", self.name)
                    self._finish_recording("limit")
        if chunk.ended:
            self._publish_states(chunk.applied)
            if self._recorder is not None and self._recorder.epoch == chunk.epoch:
                self._finish_recording()
            self._clock.reset()
            self._behind_warned = False

    def _publish_states(self, applied_changes: list[Applied]) -> None:
        for applied in applied_changes:
            self.last_applied = applied
            self._broadcast(self.state_message(applied))
            if self._recorder is not None and applied.epoch == self._recorder.epoch:
                self._recorder.add_state(applied)

    def _stats(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_stats < self.config.stats_interval:
            return
        self._last_stats = now
        s = self.stream
        factor = self.realtime_factor
        self._broadcast({"type": "stats", "epoch": max(s.epoch, 0), "step": s.step,
                         "seconds": round(self._generated() / self.sample_rate, 3),
                         "lead_seconds": round(self.lead_seconds(), 3),
                         "realtime_factor": round(factor, 3) if factor is not None else None,
                         "underruns": self.underruns, "listeners": self.listeners,
                         "playback": s.state.playback})

    # --- recording ----------------------------------------------------------------------------------

    async def _handle_record_requests(self) -> None:
        requests, self._record_requests = self._record_requests, []
        for command, cause in requests:
            if command == "start":
                if self._recorder is None and not self._armed:
                    self._armed = True
                    if self.stream.generator is None:  # the recording starts with the next stream
                        self._broadcast({"type": "recording", "status": "armed"})
                await self._start_armed_recording()
            elif self._recorder is not None:
                self._finish_recording()
            elif self._armed:
                self._armed = False
                self._broadcast({"type": "recording", "status": "disarmed"})
        await self._start_armed_recording()  # an armed recording whose stream has begun

    def _check_can_record(self) -> None:
        """ProtocolError when a recording may not start now: too many started lately, or too little disk."""
        if not self._record_starts.take():
            raise ProtocolError(f"record: at most {RECORD_START_BURST} recordings start in a row, then one every "
                                f"{RECORD_START_SECONDS:g} s; this start was refused")
        self._check_disk()

    def _check_disk(self) -> None:
        c = self.config
        try:
            c.record_dir.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(c.record_dir).free / 1e6
        except OSError as exc:
            raise ProtocolError(f"record: cannot write under {c.record_dir}: {exc.strerror or exc}") from None
        if free < c.record_min_free_mb:
            raise ProtocolError(f"record: only {free:.0f} MB free under {c.record_dir} (a recording needs "
                                f"--record-min-free-mb {c.record_min_free_mb:g}); not recording")

    async def _start_armed_recording(self) -> None:
        if not (self._armed and self.stream.generator is not None and self._recorder is None):
            return
        self._armed = False
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
        base = self.config.record_dir / f"{self.name}-{self.stream.epoch}-{stamp}"
        try:
            self._check_disk()  # again: an armed recording may start long after it was asked for
            # In the worker, where the stream steps (so it does not step meanwhile): a recording started mid-stream
            # first writes the stream's whole history, which for a long stream is many megabytes of log lines.
            self._recorder = await self._work(self._new_recorder, base)
        except (ProtocolError, OSError) as exc:
            log.warning("session %s: %s", self.name, exc)
            self._broadcast({"type": "warning", "message": str(exc)})
            self._broadcast({"type": "recording", "status": "disarmed"})
            return
        self._broadcast({"type": "recording", "status": "started", "wav": str(self._recorder.wav_path),
                         "log": str(self._recorder.log_path), "frames": [self._recorder.first_frame, None]})

    def _new_recorder(self, base: Path) -> Recorder:
        return Recorder(base, self.stream, self.bank_paths, max_bytes=int(self.config.record_max_mb * 1e6))

    def _finish_recording(self, reason: str | None = None) -> None:
        recorder, self._recorder = self._recorder, None
        s = self.stream
        codes = s.generator.codes() if s.generator is not None and s.epoch == recorder.epoch else s.finished_codes
        message = recorder.finish(codes)
        if reason is not None:  # it reached --record-max-seconds / --record-max-mb
            message["reason"] = reason
        self._broadcast(message)
