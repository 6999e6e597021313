"""The device's scheduler: chunk requests that wait together are generated together, each stream's chunk is the
one it gets alone, and the measured cost tells how many streams the device holds at real time."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from musicrfm.engine.loop import Engine
from musicrfm.server.scheduler import REALTIME_SHARE, DeviceLoad, DeviceScheduler
from musicrfm.server.session import Session, SessionConfig
from musicrfm.server.state import ControlState
from musicrfm.server.stream import Cause, Stream

CAUSE = Cause("score")


def _playing(tiny, prompt: str, seed: int, engine: Engine | None) -> Stream:
    s = Stream(tiny, None, ControlState(prompt=prompt, seed=seed), engine=engine)
    s.submit({"type": "transport", "command": "play"}, CAUSE)
    s.apply_due()
    return s


def test_requests_waiting_together_run_as_one_batch_and_give_the_solo_chunks(tiny):
    prompts = ["piano", "drums and bass", "a choir"]

    async def together() -> tuple[list, list[Stream], DeviceScheduler]:
        engine = Engine(tiny)
        streams = [_playing(tiny, p, i, engine) for i, p in enumerate(prompts)]
        scheduler = DeviceScheduler(tiny.frame_rate)
        rounds = []
        try:
            for _ in range(4):  # four rounds of three requests made at once
                rounds.append(await asyncio.gather(*(scheduler.generate(s, 5) for s in streams)))
        finally:
            scheduler.close()
        return rounds, streams, scheduler

    rounds, batched, scheduler = asyncio.run(together())
    # The three requests of a round are made before the device thread takes any: one batch of three each round
    # (fewer than PIPELINE_FROM: not split into two groups).
    assert scheduler.batched_streams == 12 and scheduler.batches == 4
    assert list(scheduler.load.to_dict()["step_ms"]) == ["3"]
    alone = [_playing(tiny, p, i, None) for i, p in enumerate(prompts)]
    for chunks in rounds:
        for stream, chunk in zip(alone, chunks):
            solo = stream.generate(5)
            assert chunk.steps == solo.steps and chunk.first_sample == solo.first_sample
            np.testing.assert_allclose(chunk.audio, solo.audio, atol=1e-5)  # EnCodec in a batch: the same to ~1e-7
    for stream, solo in zip(batched, alone):
        assert stream.generator.codes().shape[1] == 20 - (tiny.num_codebooks - 1)
        assert stream.generator.codes().tolist() == solo.generator.codes().tolist()


def test_device_load_estimates_streams_at_real_time():
    load = DeviceLoad(frame_rate=50.0)
    assert load.capacity() is None and load.step_seconds(3) is None
    budget = REALTIME_SHARE / 50.0  # seconds a step may take: 16 ms
    load.add(1, 10, 10 * 0.004)  # 4 ms a step alone
    assert load.step_seconds(1) == pytest.approx(0.004)
    assert load.capacity() == int(budget / 0.004)  # one size seen: cost assumed to grow in proportion
    load.add(4, 10, 10 * 0.0067)  # 6.7 ms for four together: 0.9 ms more per stream
    assert load.step_seconds(8) == pytest.approx(0.004 + 7 * 0.0009)
    assert load.capacity() == 14  # 4 + 13 x 0.9 = 15.7 ms <= 16 ms < 4 + 14 x 0.9
    load.add(4, 0, 1.0)  # nothing measured: ignored
    assert load.to_dict() == {"step_ms": {"1": 4.0, "4": 6.7}, "realtime_streams": load.capacity()}


class Listener:
    def __init__(self, client_id: int):
        self.client_id, self.messages, self.audio = client_id, [], 0

    def send_audio(self, frame: bytes, samples: int) -> None:
        self.audio += 1

    def send_message(self, message: dict) -> None:
        self.messages.append(dict(message))

    def drop(self, reason: str) -> None:
        pass


def test_a_session_starting_to_play_on_a_full_device_is_told_so(tiny, tmp_path):
    async def main() -> list[dict]:
        scheduler = DeviceScheduler(tiny.frame_rate)
        scheduler.load.add(2, 10, 10 * 0.05)  # measured: two streams take 50 ms a step (real time is 20 ms)
        session = Session("full", Stream(tiny, None), SessionConfig(record_dir=tmp_path), [], scheduler)
        other = _playing(tiny, "", 0, None)
        scheduler._seen[id(other)] = (time.monotonic() + 3600, None)  # another stream is playing on the device
        listener = Listener(1)
        session.add_listener(listener)
        session.start()
        try:
            await session.handle({"type": "transport", "command": "play"}, Cause("websocket", 1, None))
            deadline = time.monotonic() + 30
            while listener.audio < 2:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
        finally:
            await session.close()
            scheduler.close()
        return listener.messages

    messages = asyncio.run(main())
    warnings = [m["message"] for m in messages if m["type"] == "warning"]
    assert any("keeps about 0 streams at real time" in w and "2 are playing" in w for w in warnings), warnings


def test_new_sessions_fill_the_padded_rows_of_a_lane_before_starting_another(tiny):
    """Rows are padded to a power of two >= 4: a lane with one guided stream (2 rows, computed as 4) takes a second
    for nothing, so two sessions share a lane; then the other lane starts; then each lane fills its padding."""
    from musicrfm.engine.loop import Engine

    lanes = [Engine(tiny, slots=4) for _ in range(2)]
    scheduler = DeviceScheduler(tiny.frame_rate, lanes)
    try:
        given = [scheduler.engine_for_new_stream() for _ in range(6)]
        assert [lanes.index(e) for e in given] == [0, 0, 1, 1, 0, 0]
        # a departure frees a place: the next newcomer fills it rather than widen the other lane's batch
        stream = type("S", (), {"engine": lanes[1]})()
        scheduler.release(stream)
        assert scheduler.engine_for_new_stream() is lanes[1]
        # a session a client stopped no longer counts (it holds no rows): newcomers fill its place; played again,
        # it counts on its lane again; stopping twice or closing a stopped session frees nothing more
        stopped = type("S", (), {"engine": lanes[0]})()
        for _ in range(2):
            scheduler.set_active(stopped, False)
        assert scheduler.engine_for_new_stream() is lanes[0]
        scheduler.set_active(stopped, False)
        scheduler.release(stopped)
        assert [lane.streams for lane in scheduler._lanes] == [4, 2]
        scheduler.set_active(type("S", (), {"engine": lanes[1]})(), False)
        assert [lane.streams for lane in scheduler._lanes] == [4, 1]
    finally:
        scheduler.close()


def test_lanes_replaying_captured_steps_give_the_eager_lanes_audio_to_the_bit(tiny):
    """`serve --capture` on a CPU: each lane replays a TorchScript trace of the step and of the EnCodec stacks
    (GIL-free, so lanes run in parallel); the audio every session gets is the eager server's, to the bit."""
    prompts = ["piano", "drums and bass", "a choir", "strings"]

    async def play(capture: bool) -> tuple[list[list[np.ndarray]], list[Engine]]:
        engines = [Engine(tiny, capture=capture) for _ in range(2)]
        scheduler = DeviceScheduler(tiny.frame_rate, engines)
        streams = [_playing(tiny, p, i, scheduler.engine_for_new_stream()) for i, p in enumerate(prompts)]
        audio: list[list[np.ndarray]] = [[] for _ in streams]
        try:
            for _ in range(6):
                for a, chunk in zip(audio, await asyncio.gather(*(scheduler.generate(s, 5) for s in streams))):
                    a.append(chunk.audio)
        finally:
            scheduler.close()
        assert all(s.decoder.stacks is s.generator.engine.codec_stacks for s in streams)
        return audio, engines

    captured, engines = asyncio.run(play(True))
    eager, _ = asyncio.run(play(False))
    for e in engines:
        assert e.captured.reason is None and e.captured.replays > 0
        assert e.codec_stacks.reason is None and e.codec_stacks.replays > 0
    for c, e in zip(captured, eager):
        assert np.array_equal(np.concatenate(c), np.concatenate(e)) and np.concatenate(c).size > 0


def test_a_session_a_client_stops_leaves_its_lane_to_newcomers(tiny, tmp_path):
    """Through the protocol: `transport stop` frees the session's place on its lane, `play` takes it back (the lanes
    of a server whose sessions came and went are shared out by who plays, not by who once did)."""
    from musicrfm.engine.loop import Engine

    async def main() -> list[list[int]]:
        lanes = [Engine(tiny) for _ in range(2)]
        scheduler = DeviceScheduler(tiny.frame_rate, lanes)
        stream = Stream(tiny, None, engine=scheduler.engine_for_new_stream())
        session = Session("s", stream, SessionConfig(record_dir=tmp_path), [], scheduler)
        counts = [[lane.streams for lane in scheduler._lanes]]
        try:
            for command in ("stop", "play", "stop"):
                await session.handle({"type": "transport", "command": command}, Cause("websocket", 1, None))
                counts.append([lane.streams for lane in scheduler._lanes])
        finally:
            await session.close()
            scheduler.close()
        counts.append([lane.streams for lane in scheduler._lanes])
        return counts

    assert asyncio.run(main()) == [[1, 0], [0, 0], [1, 0], [0, 0], [0, 0]]
