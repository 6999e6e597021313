"""`musicrfm serve` over real sockets (docs/protocol.md): a real server process (tiny-random on CPU, its audio
is noise), real WebSocket, HTTP and TCP clients. Each test uses its own session; the few tests about how the
server starts and stops run servers of their own."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np

from musicrfm.engine.audio import read_wav
from musicrfm.protocol.connection import HandshakeRefused
from musicrfm.protocol.wire import AUDIO_MAGIC, MAX_MESSAGE_BYTES
from musicrfm.server.app import RELATIVE_KNOB_MAX
from musicrfm.server.recording import read_log, replay

from live_server import start_server, stop_server, wait_for_output
from live_client import LiveClient, RawClient, contiguity_problems

# A liveness bound, not a performance one: the longest wait between two audio frames of a playing session
# (measured: at most ~0.5 s on a 2-core box, ~1.4 s with both cores busy with something else).
MAX_AUDIO_GAP = 3.0


# The live_server fixture (tests/live_server.py) with room for one session per test of this module (more than the default 8).
SERVER_ARGS = ("--max-sessions", "16")


def client(server, session: str, **kwargs) -> LiveClient:
    encoding = kwargs.pop("encoding", "json")
    params = {"encoding": encoding} if encoding != "json" else {}
    return LiveClient(server.ws_url(session, **params), encoding=encoding, **kwargs)


def play(c: LiveClient, id_: str) -> dict:
    state = c.request({"type": "transport", "command": "play", "id": id_})
    assert state["type"] == "state" and state["state"]["playback"] == "playing", state
    return state


def stop(c: LiveClient) -> None:
    """Stop the session's stream (tests leave no session generating behind them)."""
    if c.alive:
        c.send({"type": "transport", "command": "stop"})


def audio_after(c: LiveClient, message: dict) -> list:
    """The audio frames that arrived after a control message (the reader keeps both in arrival order)."""
    return c.audio[c.audio_at[c.messages.index(message)]:]


# --- hello ----------------------------------------------------------------------------------------------


def test_hello_describes_the_server_and_the_session(live_server, tiny):
    with client(live_server, "t-hello") as a, client(live_server, "t-hello") as b:
        h = a.hello
        assert isinstance(a.control_frames[0], str)  # JSON text unless the client asks for msgpack
        assert h["type"] == "hello" and h["protocol"] == 1 and h["session"] == "t-hello"
        assert isinstance(h["client_id"], int) and b.hello["client_id"] != h["client_id"]
        assert h["sample_rate"] == tiny.sample_rate and h["channels"] == 1
        assert h["hop"] == int(tiny.hop_length) and h["frame_rate"] == tiny.frame_rate
        assert h["hop"] * h["frame_rate"] == h["sample_rate"]
        assert h["codebooks"] == tiny.num_codebooks
        assert h["audio"] == {"format": "f32le", "header_bytes": 40}
        assert h["model"] == "tiny-random" and h["random_weights"] is True and "noise" in h["note"]
        assert h["directions"] == ["notes:C", "notes:G"]  # the test bank's
        assert h["example_prompts"] == []  # only a bundled model has example prompts
        # Every bound a client may meet, with this server's settings (--max-sessions 16 here).
        assert h["limits"] == {
            "max_message_bytes": MAX_MESSAGE_BYTES, "messages_per_second": 100, "message_burst": 200,
            "coefficient_max": RELATIVE_KNOB_MAX, "max_sessions": 16, "idle_seconds": 300, "max_id_chars": 64,
            "max_nesting": 32, "max_prompt_chars": 2000, "max_directions": 64, "max_direction_key_chars": 128,
            "max_schedule_points": 64, "max_state_bytes": 32768, "max_future_changes": 4096,
            "max_out_of_order_changes": 64, "prompt_min_seconds": 0.1, "prompt_encode_share": 0.25,
            "record_start_burst": 3, "record_start_seconds": 10,
            "record_max_seconds": 3600, "record_max_mb": 1024, "record_min_free_mb": 512}
        # what a coefficient means: relative units, the full knob, and the layer norms (the test bank's)
        strength = h["strength"]
        assert strength["units"] == "relative" and strength["coefficient_max"] == RELATIVE_KNOB_MAX
        assert strength["layer_norms"] == [4.0] * tiny.num_layers
        assert h["state"]["units"] == "relative"
        assert (h["version"], h["epoch"], h["step"]) == (0, 0, 0)
        assert h["state"]["playback"] == "stopped" and h["state"]["directions"] == {}
        assert h["recording"] == {"status": "off"}
        assert b.hello["state"] == h["state"]
        # The limits are the ones the server applies: one character past each is refused, naming it.
        limits = h["limits"]
        for patch, says in (
                ({"prompt": "p" * (limits["max_prompt_chars"] + 1)},
                 f"at most {limits['max_prompt_chars']} characters"),
                ({"directions": {"notes:" + "C" * limits["max_direction_key_chars"]: {"coefficient": 1}}},
                 f"at most {limits['max_direction_key_chars']} characters"),
                ({"directions": {"notes:C": {"coefficient": 1, "schedule": {"kind": "keyframes", "points": [
                    [i, 0.5] for i in range(limits["max_schedule_points"] + 1)]}}}},
                 f"at most {limits['max_schedule_points']} keyframe points")):
            error = a.request({"type": "set", "id": "over", **patch})
            assert error["type"] == "error" and says in error["message"], (says, error)
        mark = a.mark()
        a.send({"type": "get", "id": "i" * (limits["max_id_chars"] + 1)})
        error = a.wait(lambda m: m["type"] == "error", since=mark)  # (its id is not echoed: it is null)
        assert f"at most {limits['max_id_chars']} characters" in error["message"] and error["id"] is None, error


# --- transport ------------------------------------------------------------------------------------------


def check_frames(frames: list, sample_rate: int) -> None:
    for f in frames:
        h = f.header
        assert h.sample_rate == sample_rate and h.num_samples == f.pcm.shape[0] > 0
        assert h.step_end >= h.step_start
        assert np.isfinite(f.pcm).all() and np.abs(f.pcm).max() <= 1.0
    for a, b in zip(frames, frames[1:]):
        if a.header.epoch == b.header.epoch:
            assert b.header.step_start >= a.header.step_end
            assert b.header.control_version >= a.header.control_version


def test_play_pause_resume_stop_and_play_again(live_server):
    with client(live_server, "t-transport", keep_pcm=True) as c:
        rate = c.hello["sample_rate"]
        played = play(c, "p1")
        assert (played["epoch"], played["step"]) == (0, 0)
        first = c.wait_audio(6)
        assert first[0].header.first_sample == 0 and first[0].header.epoch == 0
        assert first[0].header.control_version >= played["version"]
        check_frames(first, rate)
        assert contiguity_problems(first) == []

        # pause: generation halts; nothing generated after the step it applied at.
        paused = c.request({"type": "transport", "command": "pause", "id": "p2"})
        assert paused["state"]["playback"] == "paused"
        time.sleep(1.5)
        after = audio_after(c, paused)
        assert len(after) <= 1 and all(f.header.step_end <= paused["step"] for f in after), \
            [(f.header.step_start, f.header.step_end) for f in after]
        last = c.audio[-1].header
        n = c.audio_mark()

        # play: the same epoch goes on at the next sample.
        resumed = play(c, "p3")
        assert resumed["epoch"] == 0 and resumed["step"] >= paused["step"]
        more = c.wait_audio(4, since=n)
        assert more[0].header.epoch == 0 and more[0].header.first_sample == last.first_sample + last.num_samples

        # stop: the stream ends (its state comes after its last audio: nothing more of it follows).
        stopped = c.request({"type": "transport", "command": "stop", "id": "p4"})
        assert stopped["state"]["playback"] == "stopped" and stopped["epoch"] == 0
        time.sleep(1.0)
        assert audio_after(c, stopped) == []
        epoch0 = list(c.audio)
        assert all(f.header.epoch == 0 for f in epoch0)
        assert contiguity_problems(epoch0) == []
        check_frames(epoch0, rate)

        # play: a new stream, epoch + 1, from sample 0.
        again = play(c, "p5")
        assert (again["epoch"], again["step"]) == (1, 0)
        new = c.wait_audio(4, since=len(epoch0))
        assert [f.header.epoch for f in new] == [1] * 4
        assert new[0].header.first_sample == 0 and contiguity_problems(new) == []
        stop(c)


# --- set, echo, errors ------------------------------------------------------------------------------------


def test_a_set_is_echoed_to_every_client_of_the_session_and_no_other(live_server):
    with client(live_server, "t-echo") as a, client(live_server, "t-echo") as b, \
            client(live_server, "t-echo-other") as other:
        mark_b, mark_other = b.mark(), other.mark()
        echo = a.request({"type": "set", "id": "echo-1", "directions": {"notes:C": {"coefficient": 0.6}}})
        assert echo["type"] == "state", echo
        assert echo["state"]["directions"]["notes:C"] == {"coefficient": 0.6, "schedule": {"kind": "constant"},
                                                          "active": True}
        assert echo["version"] > a.hello["version"]
        assert echo["cause"] == {"via": "websocket", "client_id": a.hello["client_id"], "id": "echo-1"}
        seen_by_b = b.wait(lambda m: m["type"] == "state" and m["cause"] and m["cause"]["id"] == "echo-1",
                           since=mark_b)
        assert seen_by_b == echo
        # The other session: its state did not change, and it was sent nothing of that change (its own `get`
        # answer is queued behind anything the change would have sent it).
        assert other.get_state()["state"]["directions"] == {}
        assert [m for m in other.messages[mark_other:] if m["type"] == "state" and m["state"]["directions"]] == []
        assert a.get_state()["version"] == echo["version"]


BAD_MESSAGES = [  # (message, words the error must name)
    ('{"type": "set", "id": "e1", "directions": {"notes:H": {"coefficient": 0.5}}}', ["unknown direction", "notes:H"]),
    ('{"type": "set", "id": "e2", "directions": {"notes:C": {"coefficient": NaN}}}', ["coefficient", "nan"]),
    ('{"type": "set", "id": "e3", "gate": {"p": Infinity}}', ["gate", "p", "inf"]),
    ('{"type": "set", "id": "e4", "gate": {"p": 0.5}, "tempo": 120}', ["unknown field", "tempo"]),
    ('{"type": "set", "id": "e5", "directions": {"notes:C": {"coefficient": 0.5, "colour": "red"}}}',
     ["unknown field", "colour"]),
    ('{"type": "set", "id": "e6", "prompt": "changed", "directions": {"notes:C": {"coefficient": "high"}}}',
     ["coefficient", "high"]),
    ('{"type": "set", "id": "e7", "directions": {"notes:C": {"coefficient": 1e30}}}', ["notes:C", "too strong"]),
    ('{"type": "transport", "id": "e8", "command": "jump"}', ["command", "jump"]),
    ('{"type": "transport", "id": "e9", "command": "play", "at_step": -1}', ["at_step", "-1"]),
    ('{"type": "transport", "id": "e10", "command": "stop", "speed": 2}', ["unknown field", "speed"]),
    ('{"type": "record", "id": 11, "command": "pause"}', ["record", "pause"]),
    ('{"type": "dance", "id": "e12"}', ["unknown message type", "dance"]),
]


def test_bad_messages_get_an_error_naming_the_problem_and_change_nothing(live_server):
    with client(live_server, "t-errors") as c:
        before = c.get_state()
        for text, words in BAD_MESSAGES:
            message_id = json.loads(text.replace("NaN", "0").replace("Infinity", "0"))["id"]
            mark = c.mark()
            c.send(text)
            error = c.wait(lambda m: m["type"] == "error" and m.get("id") == message_id, since=mark)
            for word in words:
                assert word.lower() in error["message"].lower(), (text, error)
            assert [m for m in c.messages[mark:] if m["type"] == "state"] == [], text
        after = c.get_state()
        assert after["version"] == before["version"] and after["state"] == before["state"]
        assert after["state"]["playback"] == "stopped" and after["state"]["prompt"] == ""


# --- at_step ----------------------------------------------------------------------------------------------


def test_a_set_with_at_step_applies_exactly_at_that_step(live_server):
    with client(live_server, "t-atstep") as c:
        play(c, "a0")
        c.wait_audio(3)
        target = max(f.header.step_end for f in c.audio) + 50  # 1 s ahead of every step run so far
        mark = c.mark()
        c.send({"type": "set", "id": "at-1", "at_step": target,
                "directions": {"notes:C": {"coefficient": 0.4, "schedule": {"kind": "fade_in", "length": 100}}}})
        applied = c.wait(lambda m: m["type"] == "state" and (m["cause"] or {}).get("id") == "at-1", since=mark,
                         timeout=60)
        assert applied["step"] == target
        # The schedule (relative in the set) is stored on the stream's clock, from the step it applied at.
        assert applied["state"]["directions"]["notes:C"]["schedule"] == {"kind": "fade_in", "start": target,
                                                                          "length": 100, "curve": "equal_power"}
        # The audio says which chunk used it: the one whose steps hold `target`, and none before.
        n = c.audio_mark()
        c.wait_audio(2, since=n)
        for f in c.audio:
            h = f.header
            if h.step_end <= target:
                assert h.control_version < applied["version"], (h, applied["version"])
            elif h.step_start <= target:
                assert h.control_version == applied["version"], (h, applied["version"])
        # A step already past applies at the next step.
        now = max(f.header.step_end for f in c.audio)
        late = c.request({"type": "set", "id": "at-2", "at_step": 1, "gate": {"p": 0.5}})
        assert late["type"] == "state" and late["step"] >= now and late["state"]["gate"]["p"] == 0.5
        stop(c)


# --- msgpack ----------------------------------------------------------------------------------------------


def is_msgpack_map(frame) -> bool:
    return isinstance(frame, bytes) and (0x80 <= frame[0] <= 0x8F or frame[0] in (0xDE, 0xDF))


def test_msgpack_clients_receive_and_send_msgpack(live_server):
    with client(live_server, "t-msgpack", encoding="msgpack") as m, client(live_server, "t-msgpack") as j:
        assert is_msgpack_map(m.control_frames[0]) and m.hello["type"] == "hello"
        assert m.hello["directions"] == ["notes:C", "notes:G"]
        mark_j = j.mark()
        echo = m.request({"type": "set", "id": 7, "directions": {"notes:G": {"coefficient": 0.3}}})  # a binary frame
        assert echo["type"] == "state" and echo["cause"]["id"] == 7
        assert echo["state"]["directions"]["notes:G"]["coefficient"] == 0.3
        # The JSON client of the same session gets the same change as JSON text.
        seen = j.wait(lambda x: x["type"] == "state" and (x["cause"] or {}).get("id") == 7, since=mark_j)
        assert seen["version"] == echo["version"]
        assert all(isinstance(f, str) for f in j.control_frames)
        # Errors come as msgpack too (a NaN a msgpack float carries), with the id.
        error = m.request({"type": "set", "id": 8, "gate": {"p": float("nan")}})
        assert error["type"] == "error" and "nan" in error["message"].lower()
        # Audio frames still start with MRFA; every control frame is a msgpack map (never 'M').
        play(m, "m-play")
        m.wait_audio(3)
        assert m.error is None and all(is_msgpack_map(f) for f in m.control_frames)
        assert AUDIO_MAGIC[0] not in (0x80, 0xDE, 0xDF) and not 0x80 <= AUDIO_MAGIC[0] <= 0x8F
        stop(m)


# --- slow and vanishing clients ---------------------------------------------------------------------------


def test_a_slow_client_is_closed_and_a_vanished_one_is_forgotten_while_others_play_on(live_server):
    with client(live_server, "t-slow") as good:
        play(good, "s-play")
        good.wait_audio(3)
        slow = RawClient(live_server, "t-slow")
        slow.send_json({"type": "transport", "command": "play"})
        # It never reads: its queue of audio fills up, and the server closes it (1013), without waiting for it.
        wait_for_output(live_server, f"client {slow.hello['client_id']} is too slow", timeout=90)
        assert slow.read_until_closed() == 1013
        slow.sock.close()
        n = good.audio_mark()
        good.wait_audio(10, since=n)

        # A client that vanishes mid-stream (no close frame, a TCP reset) is dropped; nobody else notices.
        gone = RawClient(live_server, "t-slow")
        while gone.audio_frames() < 3:
            gone._read_some()
        gone.abort()
        wait_for_output(live_server, f"client {gone.hello['client_id']} left session t-slow", timeout=60)
        n = good.audio_mark()
        good.wait_audio(10, since=n)

        assert good.alive and good.closed is None and good.error is None
        assert contiguity_problems(good.audio) == [] and {f.header.epoch for f in good.audio} == {0}
        gaps = np.diff([f.arrived for f in good.audio[3:]])
        assert gaps.max() < MAX_AUDIO_GAP, gaps.max()
        stop(good)


# --- recording and replay -----------------------------------------------------------------------------------


def test_a_recording_with_a_change_in_the_middle_replays_to_the_same_tokens(live_server, tmp_path):
    with client(live_server, "t-record", keep_pcm=True) as c:
        hop = c.hello["hop"]
        play(c, "r-play")
        c.wait_audio(3)
        mark = c.mark()
        c.send({"type": "record", "command": "start"})
        started = c.wait(lambda m: m["type"] == "recording" and m["status"] == "started", since=mark)
        first = started["frames"][0]
        c.wait_audio(20, since=c.audio_mark())  # ~2 s
        change = c.request({"type": "set", "id": "r-set", "directions": {"notes:C": {"coefficient": 0.8}},
                            "gate": {"p": 0.7}})
        assert change["type"] == "state"
        c.wait_audio(20, since=c.audio_mark())
        mark = c.mark()
        c.send({"type": "record", "command": "stop"})
        done = c.wait(lambda m: m["type"] == "recording" and m["status"] == "stopped", since=mark)
        stop(c)

    assert done["frames"][0] == first and done["frames"][1] - first >= 150  # 3 s and more
    audio, rate = read_wav(done["wav"])
    header, states, end = read_log(done["log"])
    assert rate == c.hello["sample_rate"] and end["frames"] == done["frames"]
    assert audio.shape[0] == end["samples"] == (done["frames"][1] - first) * hop
    assert end["tokens_sha256"] == done["tokens_sha256"]
    # The change is in the log, at the step it applied at; the WAV holds what the client heard.
    assert (change["step"], change["state"]) in [(step, {**state, "playback": "playing"}) for step, state in states]
    heard = np.concatenate([f.pcm for f in c.audio])
    assert np.abs(audio - heard[first * hop:first * hop + audio.shape[0]]).max() <= 1.5 / 32767

    out = tmp_path / "again.wav"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")  # one intra-op thread: see conftest.py
    result = subprocess.run([sys.executable, "-m", "musicrfm", "replay", done["log"], "--out", str(out), "--quiet"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tokens match" in result.stdout, result.stdout
    again, _ = read_wav(out)
    assert again.shape == audio.shape


# --- HTTP ---------------------------------------------------------------------------------------------------


def http_get(host: str, port: int, path: str, headers: dict | None = None) -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type") or "", response.read()
    finally:
        conn.close()


def test_http_serves_the_page_and_health_and_nothing_else(live_server):
    host, port = "127.0.0.1", live_server.port
    status, kind, body = http_get(host, port, "/")
    assert status == 200 and kind.startswith("text/html") and b"<html" in body.lower()
    status, kind, body = http_get(host, port, "/health")
    assert status == 200 and kind == "application/json"
    health = json.loads(body)
    assert health["ok"] is True and isinstance(health["sessions"], list)
    status, kind, _ = http_get(host, port, "/app.js")
    assert status == 200 and kind.startswith("text/javascript")
    for path in ["/../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/..%2f..%2fetc%2fpasswd", "/app.js/../../../etc/passwd",
                 "/nope", "/nope.html", "/.git/config", "/clients/web/index.html", "/web/app.js", "//etc/passwd"]:
        status, _, body = http_get(host, port, path)
        assert status == 404, (path, status)
        assert b"root:" not in body


def test_the_server_said_nothing_alarming(live_server):
    """Run last in this module: nothing any test did made the server print a traceback."""
    bad = [line for line in live_server.output
           if "traceback" in line.lower() or "exception" in line.lower() or line.startswith(("ERROR", "CRITICAL"))]
    assert bad == [], "\n".join(live_server.output[-60:])


# --- servers of their own: tokens, shutdown --------------------------------------------------------------------


def ws_status(url: str) -> int | None:
    """The HTTP status a WebSocket handshake gets (None: it succeeded)."""
    try:
        with LiveClient(url, timeout=10):
            return None
    except HandshakeRefused as exc:
        return exc.status


def test_binding_beyond_loopback_needs_a_token(test_bank_path, tmp_path):
    server = start_server(test_bank_path, tmp_path / "rec-a", "--host", "0.0.0.0")
    try:
        line = wait_for_output(server, "clients need ?token=", timeout=5)
        token = line.split("?token=")[1].split()[0]
        assert len(token) >= 16
        base = f"ws://127.0.0.1:{server.port}/ws?session=t-token"
        assert ws_status(base) == 403
        assert ws_status(base + "&token=" + token[:-1] + "x") == 403
        assert ws_status(base + "&token=" + token) is None
        assert http_get("127.0.0.1", server.port, "/")[0] == 403
        assert http_get("127.0.0.1", server.port, "/ws?session=t-token")[0] == 403
        assert http_get("127.0.0.1", server.port, "/?token=wrong")[0] == 403
        status, kind, _ = http_get("127.0.0.1", server.port, "/?token=" + token)
        assert status == 200 and kind.startswith("text/html")
        # The URLs it prints carry the token: the page's opens as printed, the WebSocket's connects.
        page = re.search(r"page: http://0\.0\.0\.0:(\d+)(/\S*)\s+websocket: (ws://\S+)",
                         wait_for_output(server, "page: ", timeout=5))
        assert page and page.group(2) == f"/?token={token}", server.output
        assert http_get("127.0.0.1", int(page.group(1)), page.group(2))[0] == 200
        assert page.group(3).endswith(f"/ws?session=main&token={token}")
        assert ws_status(page.group(3).replace("0.0.0.0", "127.0.0.1")) is None
    finally:
        assert stop_server(server) == 0

    server = start_server(test_bank_path, tmp_path / "rec-b", "--host", "0.0.0.0", "--token", "abc")
    try:
        assert not any("clients need ?token=" in line for line in server.output)  # the given one, not a new one
        base = f"ws://127.0.0.1:{server.port}/ws?session=t-token"
        assert ws_status(base) == 403
        assert ws_status(base + "&token=abd") == 403
        assert ws_status(base + "&token=abc") is None
        assert http_get("127.0.0.1", server.port, "/")[0] == 403
        assert http_get("127.0.0.1", server.port, "/?token=abc")[0] == 200
        assert f"page: http://0.0.0.0:{server.port}/?token=abc " in wait_for_output(server, "page: ", timeout=5)
    finally:
        assert stop_server(server) == 0


def test_sigint_closes_clients_with_1001_and_finishes_the_recording(test_bank_path, tmp_path):
    server = start_server(test_bank_path, tmp_path / "rec")
    try:
        with client(server, "t-shutdown", keep_pcm=True) as c:
            play(c, "d-play")
            mark = c.mark()
            c.send({"type": "record", "command": "start"})
            started = c.wait(lambda m: m["type"] == "recording" and m["status"] == "started", since=mark)
            c.wait_audio(15)
            server.process.send_signal(signal.SIGINT)
            closed = c.wait_closed(30)
            assert closed is not None and closed.code == 1001, closed
        assert server.process.wait(30) == 0
    finally:
        if server.process.poll() is None:
            server.process.kill()
    # The recording is complete: the log has its end line, and the WAV exactly the samples it announces.
    header, states, end = read_log(started["log"])
    audio, _ = read_wav(started["wav"])
    assert end is not None and end["frames"][0] == started["frames"][0]
    assert audio.shape[0] == end["samples"] == (end["frames"][1] - end["frames"][0]) * header["hop"]
    assert audio.shape[0] > 0
    first = started["frames"][0] * header["hop"]
    heard = np.concatenate([f.pcm for f in c.audio])[first:]
    overlap = min(heard.shape[0], audio.shape[0])
    assert overlap > 0 and np.abs(audio[:overlap] - heard[:overlap]).max() <= 1.5 / 32767
    assert not [line for line in server.output if "traceback" in line.lower() or "exception" in line.lower()]


# --- sessions on one device ---------------------------------------------------------------------------------


def test_sessions_playing_at_once_step_together_and_each_replays_alone(live_server, tiny):
    """Three sessions play, steered differently, on the server's one engine: their chunks are generated in
    batched steps (the server's /health shows batches of 2 and more), and each one's recording replays, alone,
    to the very tokens it was recorded with."""
    names = [f"t-batch{i}" for i in range(3)]
    done = []
    with contextlib.ExitStack() as stack:
        clients = [stack.enter_context(client(live_server, name)) for name in names]
        for i, c in enumerate(clients):
            c.request({"type": "set", "id": f"b-{i}", "prompt": f"prompt number {i}", "seed": 10 + i,
                       "directions": {"notes:C": {"coefficient": 0.2 * i}, "notes:G": {"coefficient": -0.1 * i}}})
            mark = c.mark()
            c.send({"type": "record", "command": "start"})
            c.wait(lambda m: m["type"] == "recording" and m["status"] == "armed", since=mark)
        for i, c in enumerate(clients):
            play(c, f"b-play{i}")
        deadline, batched = time.monotonic() + 60, False
        while not batched and time.monotonic() < deadline:
            health = json.loads(http_get("127.0.0.1", live_server.port, "/health")[2])
            batched = any(int(n) >= 2 for n in health["device"]["step_ms"])
            time.sleep(0.2)
        assert batched, health
        for i, c in enumerate(clients):
            c.wait_audio(8, since=c.audio_mark())
            c.request({"type": "set", "id": f"b-change{i}", "directions": {"notes:C": {"coefficient": 0.5}}})
        for c in clients:
            c.wait_audio(8, since=c.audio_mark())
            mark = c.mark()
            c.send({"type": "record", "command": "stop"})
            done.append(c.wait(lambda m: m["type"] == "recording" and m["status"] == "stopped", since=mark))
            stop(c)
    for d in done:
        assert d["frames"][0] == 0 and d["frames"][1] >= 60
        again = replay(d["log"], model=tiny, progress=False)
        assert again.matches and again.problems == [], again.problems
