"""Hostile and valid-but-costly input against a real `musicrfm serve` (issue 12, items 3, 6 and 7): long OSC keys,
OSC floods, record toggles, huge schedules, bursts of prompts, sessions nobody uses, recordings that run on.

Everything here speaks the public protocol over real sockets: OSC over UDP (the Client of test_osc.py), the
WebSocket through tests/live_client.py, the CLI as a subprocess. No timing is asserted beyond liveness bounds:
counts, sizes and "the server keeps answering"."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

import msgpack
import pytest
from pythonosc.osc_bundle_builder import IMMEDIATELY, OscBundleBuilder
from pythonosc.osc_message import OscMessage

from musicrfm.protocol.wire import MAX_MESSAGE_BYTES
from musicrfm.server.osc import MESSAGE_BURST
from musicrfm.server.recording import read_log
from musicrfm.server.session import RECORD_START_BURST
from musicrfm.server.state import MAX_SCHEDULE_POINTS, MAX_STATE_BYTES, ControlState, apply_patch
from musicrfm.protocol.wire import ProtocolError

from live_client import LiveClient, contiguity_problems
from live_server import start_server, stop_server, wait_for_output
from test_osc import Client, message

MAX_AUDIO_GAP = 3.0  # a liveness bound (test_server.py): the longest wait between two audio frames


# The live_server fixture (tests/live_server.py) with room for the sessions these tests make.
SERVER_ARGS = ("--max-sessions", "16")


def state_of(osc: Client, session: str) -> dict:
    """The session's state echo as {address: params} (`/sync` answers with the whole state)."""
    return dict(osc.sync(session))


def wait_playing(osc: Client, session: str) -> dict:
    """Play the session over OSC and wait until its stream has started (polling, within the rate limit)."""
    osc.send(f"/musicrfm/{session}/play")
    deadline = time.monotonic() + 30
    while (echo := state_of(osc, session))[f"/musicrfm/{session}/playback"] != ["playing"]:
        assert time.monotonic() < deadline, echo
        time.sleep(0.1)
    return echo


def bundle(*messages: bytes) -> bytes:
    builder = OscBundleBuilder(IMMEDIATELY)
    for m in messages:
        builder.add_content(OscMessage(m))
    return builder.build().dgram


def recordings(server, session: str) -> list:
    return sorted(server.record_dir.glob(f"{session}-*.wav"))


# --- item 3: OSC ------------------------------------------------------------------------------------------


def test_a_60kb_direction_key_is_refused_and_other_senders_are_answered(live_server):
    """The key parsing was quadratic: one such datagram froze the server for seconds and took gigabytes. Now
    it is answered at once with an error, and every sync of another sender, sent after each one, is answered."""
    address = "/musicrfm/t-longkey/direction/notes:" + "As" * 30_000 + "/coefficient"
    packet = message(address, ("f", 0.5))
    assert 60_000 <= len(packet) <= MAX_MESSAGE_BYTES
    attacker, other = Client(live_server.osc_port), Client(live_server.osc_port)
    try:
        for _ in range(5):
            attacker.send_raw(packet)
            assert state_of(other, "t-longkey")["/musicrfm/t-longkey/version"]  # answered: the server is free
            error = attacker.error(timeout=30)
            assert "too long" in error and "at most 128" in error and len(error) < 200, error
    finally:
        attacker.close()
        other.close()


def test_an_osc_flood_is_rate_limited_and_record_toggles_make_few_files(live_server):
    """10 datagrams of 100 `/record 1` + `/record 0` pairs once made 2,000 files. A sender gets MESSAGE_BURST
    messages at once (then 100 a second), and a session's recordings start at most RECORD_START_BURST at
    once (then one each 10 s)."""
    session = "t-toggle"
    osc = Client(live_server.osc_port)
    try:
        wait_playing(osc, session)
        time.sleep(2.0)  # a full bucket
        toggles = [message(f"/musicrfm/{session}/record", ("i", on)) for _ in range(MESSAGE_BURST // 4) for on in (1, 0)]
        for _ in range(10):
            osc.send_raw(bundle(*toggles))
        errors = []
        while (got := osc.packet(2.0)) is not None:
            errors += [params[0] for address, params in got if address == "/musicrfm/error"]
        assert any("rate limit" in e for e in errors), errors[:5]
        assert any("recordings start" in e for e in errors), errors[:5]
        osc.send(f"/musicrfm/{session}/stop")
        state_of(osc, session)
        # The requests the session took (one datagram's worth) are handled in order by its loop.
        time.sleep(2.0)
        assert 1 <= len(recordings(live_server, session)) <= RECORD_START_BURST + 1
    finally:
        osc.close()


# --- item 6: costly but valid -------------------------------------------------------------------------------


def test_a_schedule_of_10000_points_is_refused_and_64_are_taken(live_server):
    with LiveClient(live_server.ws_url("t-points")) as c:
        points = [[i, i % 2] for i in range(10_000)]  # small integers: msgpack fits 10,000 in 50 KB
        frame = msgpack.packb({"type": "set", "id": "big", "directions": {
            "notes:C": {"coefficient": 0.5, "schedule": {"kind": "keyframes", "points": points}}}})
        assert len(frame) < MAX_MESSAGE_BYTES  # it fits a frame: only the schedule limit refuses it
        mark = c.mark()
        c.send(frame)
        error = c.wait(lambda m: m.get("id") == "big", since=mark)
        assert error["type"] == "error" and f"at most {MAX_SCHEDULE_POINTS} keyframe points, got 10000" in error["message"]
        text = "keyframes:" + ",".join(f"{i * 10}={i % 3}" for i in range(MAX_SCHEDULE_POINTS))
        ok = c.request({"type": "set", "id": "ok", "directions": {"notes:C": {"coefficient": 0.5, "schedule": text}}})
        assert ok["type"] == "state", ok
        assert len(ok["state"]["directions"]["notes:C"]["schedule"]["points"]) == MAX_SCHEDULE_POINTS


def test_the_state_is_bounded_in_size():
    """Within every other limit, 64 directions of 64 keyframes would make each `state` message ~100 KB."""
    text = "keyframes:" + ",".join(f"{i}={i % 5}" for i in range(MAX_SCHEDULE_POINTS))
    patch = {"directions": {f"notes:K{i}": {"coefficient": 1.0, "schedule": text} for i in range(64)}}
    with pytest.raises(ProtocolError, match=f"at most {MAX_STATE_BYTES}"):
        apply_patch(ControlState(), patch, step=0)


def test_a_burst_of_long_prompts_does_not_stop_a_listeners_audio(live_server):
    with LiveClient(live_server.ws_url("t-prompts")) as c:
        state = c.request({"type": "transport", "command": "play", "id": "play"})
        assert state["type"] == "state"
        c.wait_audio(5)
        mark = c.mark()
        for i in range(50):
            c.send({"type": "set", "prompt": f"{i:04d} " + "x" * 1995})
        last = c.wait(lambda m: m["type"] == "state" and m["state"]["prompt"].startswith("0049"), since=mark, timeout=60)
        after = c.audio_mark()
        c.wait_audio(10, since=after, timeout=60)
        c.send({"type": "transport", "command": "stop"})
        assert last["cause"]["via"] == "websocket"
        # Each is echoed, in the order sent; paced by what encoding one costs (docs/protocol.md), they apply
        # together at a few steps, and only the last prompt of each is encoded.
        echoes = [m for m in c.messages[mark:] if m["type"] == "state" and m["state"]["prompt"][:4].isdigit()]
        assert [int(m["state"]["prompt"][:4]) for m in echoes] == list(range(50))
        assert len({m["step"] for m in echoes}) <= 5, sorted({m["step"] for m in echoes})
        assert contiguity_problems(c.audio) == [] and {f.header.epoch for f in c.audio} == {state["epoch"]}
        gaps = [b.arrived - a.arrived for a, b in zip(c.audio[3:], c.audio[4:])]
        assert max(gaps) < MAX_AUDIO_GAP, max(gaps)


def test_a_recording_started_mid_stream_writes_the_history_off_the_event_loop(tiny, test_bank_path, tmp_path,
                                                                              monkeypatch):
    """A recording started mid-stream first writes the stream's whole history (megabytes of log lines after hours
    of knob turning). That happens in the session's worker, where the stream steps: the event loop, which every
    client's messages and audio go through, runs on meanwhile."""
    import asyncio
    import threading

    from musicrfm.engine.generation import load_banks
    from musicrfm.server import session as session_module
    from musicrfm.server.session import Session, SessionConfig
    from musicrfm.server.stream import Cause, Stream
    from test_hostile_ws import FakeListener

    made_in: list[str] = []

    class SlowRecorder(session_module.Recorder):
        def __init__(self, *args, **kwargs):
            made_in.append(threading.current_thread().name)
            time.sleep(1.0)  # as long as a long history takes to write
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(session_module, "Recorder", SlowRecorder)

    async def main() -> tuple[int, dict]:
        session = Session("rec", Stream(tiny, load_banks([test_bank_path])), SessionConfig(record_dir=tmp_path),
                          [test_bank_path])
        session.start()
        listener = FakeListener(1)
        session.add_listener(listener)
        cause = Cause("websocket", 1, None)
        try:
            await session.handle({"type": "transport", "command": "play"}, cause)
            for i in range(20):  # a history of changes at several steps
                await session.handle({"type": "set", "directions": {"notes:C": {"coefficient": i / 10}}}, cause)
                await asyncio.sleep(0.02)
            await session.handle({"type": "record", "command": "start"}, cause)
            ticks, deadline = 0, time.monotonic() + 60
            while not any(m["type"] == "recording" and m["status"] == "started" for m in listener.messages):
                assert time.monotonic() < deadline, listener.messages[-3:]
                await asyncio.sleep(0.02)  # the loop's own heartbeat: it stops while something blocks the loop
                ticks += 1
            await session.handle({"type": "record", "command": "stop"}, cause)
            while not any(m["type"] == "recording" and m["status"] == "stopped" for m in listener.messages):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
        finally:
            await session.close()
        return ticks, next(m for m in listener.messages if m["type"] == "recording" and m["status"] == "stopped")

    ticks, stopped = asyncio.run(main())
    assert made_in and made_in[0].startswith("musicrfm-session-rec"), made_in  # the device thread, not the loop
    assert ticks >= 20, ticks  # ~50 heartbeats during the 1 s write, not 0
    header, states, end = read_log(stopped["log"])
    assert end is not None and len(states) >= 2 and states[0][0] == 0  # the history from step 0, then the rest


# --- item 7: sessions nobody uses ---------------------------------------------------------------------------


def test_a_session_without_listeners_does_not_generate_until_one_joins(live_server):
    session = "t-nolisten"
    osc = Client(live_server.osc_port)
    try:
        echo = wait_playing(osc, session)
        time.sleep(1.5)  # 75 steps of real time: a generating session would be past them
        assert state_of(osc, session)[f"/musicrfm/{session}/step"] == echo[f"/musicrfm/{session}/step"] == [0]
        with LiveClient(live_server.ws_url(session)) as c:  # a listener: the same stream goes on, from sample 0
            assert c.hello["state"]["playback"] == "playing"
            frames = c.wait_audio(10)
            assert frames[0].header.first_sample == 0 and frames[0].header.epoch == c.hello["epoch"]
            assert contiguity_problems(frames) == []
        steps = [state_of(osc, session)[f"/musicrfm/{session}/step"]]  # it left: generation holds again
        for _ in range(3):  # (the server may run a chunk or two before it sees the connection close)
            time.sleep(1.0)
            steps.append(state_of(osc, session)[f"/musicrfm/{session}/step"])
            if steps[-1] == steps[-2]:
                break
        assert steps[-1] == steps[-2], steps
        osc.send(f"/musicrfm/{session}/stop")
        state_of(osc, session)
    finally:
        osc.close()


def health(server) -> list[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/health", timeout=10) as r:
        return json.loads(r.read())["sessions"]


def test_idle_sessions_are_reaped_main_is_always_creatable_and_recording_needs_free_disk(test_bank_path, tmp_path):
    server = start_server(test_bank_path, tmp_path / "rec", "--max-sessions", "3", "--idle-seconds", "2",
                          "--record-min-free-mb", "1e12")
    osc = Client(server.osc_port)
    try:
        for name in ("a", "b"):
            state_of(osc, name)
        osc.send("/musicrfm/c/sync")  # the table is full but for `main`'s place
        assert "maximum of 3 sessions" in osc.error()
        with LiveClient(server.ws_url("main")) as c:  # main always has its place
            assert c.hello["session"] == "main"
            refused = c.request({"type": "record", "command": "start", "id": "rec"})
            assert refused["type"] == "error" and "--record-min-free-mb" in refused["message"], refused
            # Nobody uses a and b: they are closed, and c can be created.
            wait_for_output(server, "session a closed", timeout=30)
            wait_for_output(server, "session b closed", timeout=30)
            assert sorted(health(server)) == ["main"]
            assert state_of(osc, "c")["/musicrfm/c/version"] == [0]
            assert sorted(health(server)) == ["c", "main"]
        # main has no listener now: it is reaped too, like any other session.
        wait_for_output(server, "session main closed", timeout=30)
    finally:
        osc.close()
        assert stop_server(server) == 0, "\n".join(server.output)


def test_a_recording_stops_at_record_max_seconds_complete_and_replayable(test_bank_path, tmp_path):
    server = start_server(test_bank_path, tmp_path / "rec", "--record-max-seconds", "1")
    try:
        with LiveClient(server.ws_url("main")) as c:
            c.request({"type": "transport", "command": "play", "id": "p"})
            c.wait_audio(3)
            mark = c.mark()
            c.send({"type": "record", "command": "start"})
            started = c.wait(lambda m: m["type"] == "recording" and m["status"] == "started", since=mark)
            done = c.wait(lambda m: m["type"] == "recording" and m["status"] == "stopped", since=mark, timeout=60)
            assert c.messages[-1]["type"] != "error"
            c.send({"type": "transport", "command": "stop"})
        frame_rate = c.hello["frame_rate"]
        assert done["reason"] == "limit" and done["frames"][0] == started["frames"][0]
        assert done["frames"][1] - done["frames"][0] == round(1 * frame_rate)  # exactly --record-max-seconds
        header, states, end = read_log(done["log"])
        assert end["frames"] == done["frames"] and end["samples"] == round(frame_rate) * c.hello["hop"]
        env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
        result = subprocess.run([sys.executable, "-m", "musicrfm", "replay", done["log"], "--out",
                                 str(tmp_path / "again.wav"), "--quiet"], capture_output=True, text=True, env=env,
                                timeout=300)
        assert result.returncode == 0 and "tokens match" in result.stdout, result.stdout + result.stderr
    finally:
        assert stop_server(server) == 0, "\n".join(server.output)
