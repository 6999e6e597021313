"""The model work of one device: one thread for the language model, one for the audio codec, and the chunks
that playing sessions ask for at the same time generated together.

Each session paces itself (server/session.py) and asks for a chunk when its listeners' lead runs low. Requests
that wait while the device is busy are taken together: their streams step in one batched forward per step
(server.stream.generate_together over the shared engine.loop.Engine), so N sessions cost about one forward
per step instead of N. Under light load a request starts at once, alone; as load grows the waiting requests
gather by themselves, which is when batching pays. A batch's EnCodec decode runs on the codec thread while the
next batch steps (a pipeline of two: on a CPU the two halves cost about the same, and each gets a core). When
nothing is decoding and PIPELINE_FROM or more streams wait, a batch takes half of them, so that the sessions settle into two groups
that take turns: one steps while the other decodes. Other model work (applying changes while a stream is
stopped, starting a recording) runs on the same thread between batches, so nothing touches a stream while it
steps.

`DeviceLoad` keeps what the batches cost (seconds per step, by how many streams stepped), from which the
server tells how many streams the device holds at real time, and warns when a session starting to play would
push the others below it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from .stream import Stream, StreamChunk, decode_together, step_together

log = logging.getLogger("musicrfm.scheduler")
__all__ = ["DeviceLoad", "DeviceScheduler"]

# Streams waiting, with nothing decoding, from which a batch takes only half of them (the pipeline of two groups,
# module docstring). Fewer than this step together: for 2-3 streams a batch costs about what one stream does
# (bench/bench_sessions.py), so splitting them costs more than the overlap gains.
PIPELINE_FROM = 4
# Share of real time a device may spend generating and still be called "at real time": the rest is headroom for
# decoding jitter, the event loop and the network.
REALTIME_SHARE = 0.8


@dataclass
class DeviceLoad:
    """Measured cost of batched steps: an exponential average of seconds per step for each batch size."""

    frame_rate: float
    per_step: dict[int, float] = field(default_factory=dict)  # streams in the batch -> seconds per step
    weight: float = 0.2  # of the newest batch in the average
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, streams: int, steps: int, seconds: float) -> None:
        if streams < 1 or steps < 1 or seconds <= 0:
            return
        with self._lock:
            value = seconds / steps
            old = self.per_step.get(streams)
            self.per_step[streams] = value if old is None else (1 - self.weight) * old + self.weight * value

    def step_seconds(self, streams: int) -> float | None:
        """Seconds one step of `streams` streams takes: measured, or the straight line through what was measured
        (a batch costs a fixed part plus a part per stream); None before any measurement."""
        with self._lock:
            known = dict(self.per_step)
        if not known:
            return None
        if streams in known:
            return known[streams]
        sizes = sorted(known)
        if len(sizes) == 1:  # one size seen: assume the cost grows in proportion (pessimistic)
            return known[sizes[0]] * streams / sizes[0]
        (n0, t0), (n1, t1) = (sizes[0], known[sizes[0]]), (sizes[-1], known[sizes[-1]])
        slope = max((t1 - t0) / (n1 - n0), 0.0)
        return max(t0 + slope * (streams - n0), 1e-6)

    def capacity(self, limit: int = 64) -> int | None:
        """The most streams that step at real time (REALTIME_SHARE of each second spent generating); None
        before any measurement."""
        if not self.per_step:
            return None
        budget = REALTIME_SHARE / self.frame_rate
        best = 0
        for n in range(1, limit + 1):
            t = self.step_seconds(n)
            if t is None or t > budget:
                break
            best = n
        return best

    def to_dict(self) -> dict:
        with self._lock:
            steps = {str(n): round(t * 1000, 3) for n, t in sorted(self.per_step.items())}
        return {"step_ms": steps, "realtime_streams": self.capacity()}


class DeviceScheduler:
    """All model work of one device, on one thread; see the module docstring."""

    def __init__(self, frame_rate: float, name: str = "device"):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"musicrfm-{name}")
        self._codec = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"musicrfm-{name}-codec")
        self._decoding: set[asyncio.Task] = set()
        self._waiting: list[tuple[Stream, int, asyncio.Future]] = []
        self._draining: asyncio.Task | None = None
        self.load = DeviceLoad(frame_rate)
        self.batches = 0  # batches run, and streams they held, for stats and tests
        self.batched_streams = 0
        self._seen: dict[int, float] = {}  # id(stream) -> when it last stepped

    def active_streams(self, besides: Stream | None = None, within: float = 2.0) -> int:
        """Streams that stepped in the last `within` seconds (`besides` not counted)."""
        now = time.monotonic()
        return sum(1 for key, at in list(self._seen.items()) if now - at <= within and key != id(besides))

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn(*args) on the device's thread, after what is already queued there."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def generate(self, stream: Stream, steps: int) -> StreamChunk:
        """`stream.generate(steps)`, together with whatever other streams ask meanwhile."""
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((stream, steps, future))
        if self._draining is None or self._draining.done():
            self._draining = asyncio.get_running_loop().create_task(self._drain(), name="musicrfm device batches")
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._waiting:
            if self._decoding or len(self._waiting) < PIPELINE_FROM:
                batch, self._waiting = self._waiting, []
            else:  # nothing to overlap with: step half now, the other half while this half decodes (two groups)
                half = (len(self._waiting) + 1) // 2
                batch, self._waiting = self._waiting[:half], self._waiting[half:]
            streams = [s for s, _, _ in batch]
            steps = max(n for _, n, _ in batch)  # sessions of one server share chunk_steps
            started = time.perf_counter()
            try:
                shares = await loop.run_in_executor(self._executor, step_together, streams, steps)
            except Exception as exc:  # a bug: every stream of the batch gets it (its session logs it and stops)
                self._fail(batch, exc)
                continue
            # The decode goes on on the codec thread while the next batch steps here.
            task = loop.create_task(self._decode(batch, shares, started, time.perf_counter() - started))
            self._decoding.add(task)
            task.add_done_callback(self._decoding.discard)

    async def _decode(self, batch: list, shares: list, started: float, token_seconds: float) -> None:
        loop = asyncio.get_running_loop()
        try:
            decoded = time.perf_counter()
            chunks = await loop.run_in_executor(self._codec, decode_together, shares, started)
            codec_seconds = time.perf_counter() - decoded
        except Exception as exc:
            self._fail(batch, exc)
            return
        self._account(batch, chunks, max(token_seconds, codec_seconds))
        for (_, _, future), chunk in zip(batch, chunks):
            if not future.done():
                future.set_result(chunk)

    @staticmethod
    def _fail(batch: list, exc: Exception) -> None:
        for _, _, future in batch:
            if not future.done():
                future.set_exception(exc)

    def _account(self, batch: list, chunks: list[StreamChunk], seconds: float) -> None:
        """What a batch cost: the slower of its two halves, which is what bounds a pipeline of batches."""
        ran = [c.steps[1] - c.steps[0] for c in chunks]
        now = time.monotonic()
        self._seen = {key: at for key, at in self._seen.items() if now - at <= 60.0}
        self._seen.update((id(s), now) for (s, _, _), r in zip(batch, ran) if r)
        stepped = sum(1 for r in ran if r)
        if stepped:
            self.load.add(stepped, max(ran), seconds)
        self.batches += 1
        self.batched_streams += len(batch)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self._codec.shutdown(wait=True)
