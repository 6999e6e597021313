"""The model work of one device: lanes of streams, each lane one thread and one engine, and the chunks that
the streams of a lane ask for at the same time generated together.

Each session paces itself (server/session.py) and asks for a chunk when its listeners' lead runs low. Requests
that wait while their lane is busy are taken together: their streams step in one batched forward per step
(server.stream.generate_together over the lane's engine.loop.Engine), so N sessions cost about one forward per
step instead of N. Under light load a request starts at once, alone; as load grows the waiting requests gather by
themselves, which is when batching pays (and one wait, GATHER_SHARE, puts sessions whose requests alternate
into one batch).

Lanes: on a GPU one lane holds every session (one batch keeps the device busiest). On a CPU each core is a lane:
a batch of small matrix products does not spread over cores, so N sessions are shared out over the lanes (each
new one to the lane where it adds the fewest padded rows: a lone stream's lane takes a second for free), and every
lane batches its own. A stream's tokens are the same in any lane
and any batch (engine.loop). Other model work of a stream (applying changes while it is stopped, starting a
recording) runs on its lane's thread, between batches, so nothing touches a stream or its engine while it steps.

`DeviceLoad` keeps what the batches cost (seconds per step, by how many streams stepped), from which the server
tells how many streams the device holds at real time, and warns when a session starting to play would push the
others below it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from musicrfm.engine.loop import Engine, padded_rows

from .stream import Stream, StreamChunk, generate_together

__all__ = ["DeviceLoad", "DeviceScheduler"]

# How long a batch may wait for streams that played lately but have not asked yet, as a share of a chunk's
# duration. Sessions pace themselves, so two sessions whose requests alternate would each step alone forever (each
# asks while the other's batch runs); one wait puts them in the same batch, and there they stay, as they ask at the
# same time from then on. A whole chunk, because their requests come a chunk apart: any offset between two
# sessions is under one chunk, so the first wait always meets (at 25 %, offsets of 25-100 ms never met, and two
# bundled-model sessions sharing a lane fell to 0.92x real time; measured in docs/BENCHMARKS.md). The wait is paid
# from the session's lead (0.5 s by default), once.
GATHER_SHARE = 1.0
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


class _Lane:
    """One thread and the engine its streams step on; the requests waiting for it."""

    def __init__(self, engine: Engine | None, name: str):
        self.engine = engine
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.waiting: list[tuple[Stream, int, asyncio.Future]] = []
        self.draining: asyncio.Task | None = None
        self.streams = 0  # sessions of this lane that play or are about to (engine_for_new_stream, set_active)


class DeviceScheduler:
    """All model work of one device, in lanes; see the module docstring. `engines`: one per lane (none: one
    lane for streams that bring engines of their own, as a lone session or a test does)."""

    def __init__(self, frame_rate: float, engines: Sequence[Engine] = (), name: str = "device"):
        self._lanes = [_Lane(e, f"musicrfm-{name}-{i}") for i, e in enumerate(engines)] or [_Lane(None, f"musicrfm-{name}")]
        self._by_engine = {id(lane.engine): lane for lane in self._lanes if lane.engine is not None}
        self.load = DeviceLoad(frame_rate)
        self.batches = 0  # batches run, and streams they held, for stats and tests
        self.batched_streams = 0
        self._seen: dict[int, tuple[float, _Lane]] = {}  # id(stream) -> when it last stepped, and where
        self._stopped: set[int] = set()  # id(stream) of sessions whose stream a client stopped: not counted

    @property
    def lanes(self) -> int:
        return len(self._lanes)

    def engine_for_new_stream(self) -> Engine | None:
        """The engine a new session's stream steps on: the lane where it adds the fewest computed rows, then the
        least loaded. A batch computes its rows padded to a power of two >= MIN_ROWS (engine.loop.padded_rows), so
        a lone stream's lane has room for a second at no cost: two sessions share a lane (one core) and leave the
        other core to the event loop, instead of paying the padding twice."""
        lane = min(self._lanes, key=lambda lane: (self._rows(lane, lane.streams + 1) - self._rows(lane, lane.streams),
                                                  self._rows(lane, lane.streams), lane.streams))
        lane.streams += 1
        return lane.engine

    @staticmethod
    def _rows(lane: _Lane, streams: int) -> int:
        """Rows a step of `streams` streams computes on the lane (0 when none steps)."""
        if lane.engine is None or streams == 0:
            return streams
        return padded_rows(streams * lane.engine.rows_per_slot, lane.engine.min_rows)

    def set_active(self, stream: Stream, active: bool) -> None:
        """A client stopped a session's stream (False: its lane has room for a newcomer, who would otherwise be
        placed by sessions that no longer play), or played it again (True: counted on its lane again; a stream
        keeps its lane, since moving its cache to another lane's thread mid-flight is not worth the risk)."""
        key = id(stream)
        if active == (key not in self._stopped):
            return
        lane = self._lane(stream)
        if active:
            self._stopped.discard(key)
            lane.streams += 1
        else:
            self._stopped.add(key)
            lane.streams = max(0, lane.streams - 1)

    def release(self, stream: Stream) -> None:
        """A session went away: its lane has one stream fewer (unless it was already stopped)."""
        if id(stream) in self._stopped:
            self._stopped.discard(id(stream))
            return
        lane = self._lane(stream)
        lane.streams = max(0, lane.streams - 1)

    def _lane(self, stream: Stream) -> _Lane:
        return self._by_engine.get(id(stream.engine), self._lanes[0])

    def active_streams(self, besides: Stream | None = None, within: float = 2.0, lane: _Lane | None = None) -> int:
        """Streams (of `lane`, or of any) that stepped in the last `within` seconds (`besides` not counted)."""
        now = time.monotonic()
        return sum(1 for key, (at, where) in list(self._seen.items())
                   if now - at <= within and key != id(besides) and (lane is None or where is lane))

    def capacity(self) -> int | None:
        """Streams the device holds at real time: each lane's measured share, times the lanes."""
        each = self.load.capacity()
        return None if each is None else each * len(self._lanes)

    def to_dict(self) -> dict:
        """What /health reports of the device: the measured step cost, the lanes, the streams at real time."""
        return {**self.load.to_dict(), "lanes": self.lanes, "realtime_streams": self.capacity()}

    async def run(self, stream: Stream, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn(*args), model work for `stream`, on its lane's thread after what is already queued there."""
        return await asyncio.get_running_loop().run_in_executor(self._lane(stream).executor, fn, *args)

    async def generate(self, stream: Stream, steps: int) -> StreamChunk:
        """`stream.generate(steps)`, together with whatever other streams of its lane ask meanwhile."""
        lane = self._lane(stream)
        future = asyncio.get_running_loop().create_future()
        lane.waiting.append((stream, steps, future))
        if lane.draining is None or lane.draining.done():
            lane.draining = asyncio.get_running_loop().create_task(self._drain(lane), name="musicrfm batches")
        return await future

    async def _gather(self, lane: _Lane) -> None:
        """Wait, briefly, for the lane's streams that stepped lately and are not waiting yet (GATHER_SHARE)."""
        steps = max(n for _, n, _ in lane.waiting)
        deadline = time.monotonic() + GATHER_SHARE * steps / self.load.frame_rate
        while time.monotonic() < deadline and len(lane.waiting) < self.active_streams(within=1.0, lane=lane):
            await asyncio.sleep(0.002)

    async def _drain(self, lane: _Lane) -> None:
        loop = asyncio.get_running_loop()
        while lane.waiting:
            await self._gather(lane)
            batch, lane.waiting = lane.waiting, []
            streams = [s for s, _, _ in batch]
            steps = max(n for _, n, _ in batch)  # sessions of one server share chunk_steps
            try:
                chunks = await loop.run_in_executor(lane.executor, generate_together, streams, steps)
            except Exception as exc:  # a bug: every stream of the batch gets it (its session logs it and stops)
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self._account(batch, chunks)
            for (_, _, future), chunk in zip(batch, chunks):
                if not future.done():
                    future.set_result(chunk)

    def _account(self, batch: list, chunks: list[StreamChunk]) -> None:
        ran = [c.steps[1] - c.steps[0] for c in chunks]
        now = time.monotonic()
        self._seen = {key: seen for key, seen in self._seen.items() if now - seen[0] <= 60.0}
        self._seen.update((id(s), (now, self._lane(s))) for (s, _, _), r in zip(batch, ran) if r)
        stepped = sum(1 for r in ran if r)
        if stepped and chunks:
            self.load.add(stepped, max(ran), chunks[0].seconds)
        self.batches += 1
        self.batched_streams += len(batch)

    def close(self) -> None:
        for lane in self._lanes:
            lane.executor.shutdown(wait=True)
