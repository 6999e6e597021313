"""Fuzzing a real `musicrfm serve` (tiny-random on CPU, the `live_server` fixture) through its public protocol.

A well-behaved client plays and records session "fuzz" while attackers on the same session (and on
another one) send thousands of malformed WebSocket messages, and thousands of malformed OSC datagrams go
to the OSC port. The server must answer and drop all of it: the listener's audio is never interrupted,
nothing in the server's output is a traceback, the state never takes an invalid value, the server still
answers a fresh client, and the recording made during the attack is complete and replays to the same
tokens. Everything the attackers send is drawn from a seeded RNG (deterministic).

The generators, the attackers and the measures live in fuzzing.py, shared with bench/bench_fuzz.py (which
runs the same attack at >= 10,000 messages and prints the figures docs/BENCHMARKS.md records).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import pytest

from musicrfm.engine.audio import read_wav
from musicrfm.server.recording import read_log, replay

from fuzzing import COSTLY_KINDS, KNOWN, SESSION, Attacker, RssSampler, build_attack, playback_gaps, run_attack
from live_client import LiveClient, contiguity_problems

# The liveness bound on the listener's audio: the longest wait between two audio frames during the attack.
# Measured on a 2-core box with the server's default `--threads` (cores - 1: the event loop keeps a core):
# 0.20-0.38 s, 0.41 s with a CPU hog on one core. With two torch threads the loop shared its cores with the
# model and waits reached 0.5-1.5 s; with the stall this test found (valid `set`s for far-future steps made
# every message cost more, until the event loop could not keep up): 2.9-3.7 s.
MAX_AUDIO_GAP = 1.0
# The server's memory may grow during the attack by at most this much (measured: see docs/BENCHMARKS.md).
MAX_RSS_GROWTH = 300 * 2**20
# The longest silence a listener playing the audio as it arrives may hear during the attack, every costly kind
# included (states of two 64-point schedules, 300-character prompts): the server's lead, 0.5 s (the issue's
# bound: a listener that buffers the lead hears nothing). Measured: 0.00 s in three runs, 0.24 s with a CPU hog
# on one core (two torch threads: 0.4-1.4 s; before each change cost one check and prompts were paced: 3-17 s).
MAX_SILENCE = 0.5


@dataclass
class FuzzRun:
    listener: LiveClient
    attackers: list[Attacker]
    osc_sent: int
    fuzz_start: float
    fuzz_end: float
    fresh_hello: dict
    fresh_state: dict
    final_state: dict
    recording: dict
    seconds: dict
    rss: RssSampler


@pytest.fixture(scope="module")
def fuzzed(live_server) -> FuzzRun:
    attackers, datagrams = build_attack(costly=60, costly_kinds=COSTLY_KINDS)
    seconds: dict[str, float] = {}

    listener = LiveClient(live_server.ws_url(SESSION), keep_pcm=True)
    started = listener.request({"type": "transport", "command": "play", "id": "listen-play"})
    assert started["type"] == "state" and started["state"]["playback"] == "playing", started
    mark = listener.mark()
    listener.send({"type": "record", "command": "start", "id": "listen-rec"})
    listener.wait(lambda m: m["type"] == "recording" and m["status"] == "started", since=mark)
    listener.wait_audio(3)

    t0 = time.monotonic()
    with RssSampler(live_server.process.pid) as rss:
        seconds["fuzz"], osc_sent = run_attack(live_server, attackers, datagrams, osc_seconds=8.0, timeout=40)
        fuzz_end = time.monotonic()
    time.sleep(1.0)  # the audio must go on after the attack, too

    # A fresh client is answered, with the state echo of its own change.
    with LiveClient(live_server.ws_url(SESSION)) as fresh:
        fresh_state = fresh.request({"type": "set", "id": "fresh-1", "directions": {"notes:G": {"coefficient": 0.25}}})
        final_state = fresh.get_state()
        fresh_hello = fresh.hello

    mark = listener.mark()
    listener.send({"type": "record", "command": "stop", "id": "listen-rec-stop"})
    recording = listener.wait(lambda m: m["type"] == "recording" and m["status"] == "stopped", since=mark)
    stopped = listener.request({"type": "transport", "command": "stop", "id": "listen-stop"})
    assert stopped["type"] == "state" and stopped["state"]["playback"] == "stopped", stopped  # after the last audio
    run = FuzzRun(listener, attackers, osc_sent, t0, fuzz_end, fresh_hello, fresh_state, final_state, recording,
                  seconds, rss)
    yield run
    listener.close()


# --- the assertions -------------------------------------------------------------------------------------


def test_the_attack_was_thousands_of_bad_messages_and_each_was_answered(fuzzed):
    ws_sent = sum(a.sent for a in fuzzed.attackers)
    assert ws_sent + fuzzed.osc_sent >= 6000 and ws_sent >= 3000, (ws_sent, fuzzed.osc_sent)
    by_name = {a.name: a for a in fuzzed.attackers}
    for a in fuzzed.attackers:
        assert not a.problems, (a.name, a.problems)
        assert a.sent == len(a.frames), (a.name, a.sent)
        assert all(isinstance(e.get("message"), str) and e["message"] for e in a.errors), a.name
    for name in ("text", "msgpack", "other", "mixed"):  # nearly everything they send is refused, each with an error
        a = by_name[name]
        assert len(a.errors) >= 0.6 * a.sent, (name, len(a.errors), a.sent)
    # Each got its answers in the encoding it asked for (msgpack: binary frames, decoded by the client).
    for a in fuzzed.attackers:
        assert a.frame_kinds == ({bytes} if a.encoding == "msgpack" else {str}), (a.name, a.frame_kinds)
    # A NaN or Infinity given as a JSON literal, in a message with an id: refused with that id, naming it.
    literal_errors = [e for a in fuzzed.attackers for e in a.errors if str(e.get("id", "")).startswith("L")]
    assert any("nan" in e["message"] or "inf" in e["message"] for e in literal_errors), literal_errors[:5]
    # Beyond the rate limit the messages are dropped, and said so once (not one error each): the burst's
    # first 200 are each answered, the rest get one notice between them.
    burst = by_name["burst"]
    limited = [e for e in burst.errors if "rate limit" in e["message"]]
    answered = [e for e in burst.errors if "unknown field" in e["message"]]
    assert 1 <= len(limited) <= 2, len(limited)
    assert 200 <= len(answered) <= 300, len(answered)
    assert len(burst.errors) == len(answered) + len(limited) + 1, len(burst.errors)  # + the sentinel's
    # Oversize frames: that connection (and only that one) is closed with 1009.
    assert by_name["oversize"].closes == [1009] * 6, by_name["oversize"].closes
    for a in fuzzed.attackers:
        if a.name != "oversize":
            assert a.closes == [], (a.name, a.closes)
    # Valid changes for far-future steps wait (acknowledged by nothing), up to a bound; more are refused.
    future = by_name["future"]
    refused = [e for e in future.errors if "too many changes waiting" in e["message"]]
    assert len(future.errors) == len(refused) + 1, [e["message"] for e in future.errors][:5]  # + the sentinel's
    accepted = 300 - len(refused)
    assert 0 < accepted <= 64, accepted


def test_the_listener_never_lost_a_sample(fuzzed):
    listener = fuzzed.listener
    assert listener.alive and listener.closed is None and listener.error is None
    frames = listener.audio
    assert len(frames) >= 30, len(frames)
    assert all(a.header.epoch == 0 for a in frames)  # the stream was never stopped, reset or restarted
    assert frames[0].header.first_sample == 0 and contiguity_problems(frames) == []
    during = [a.arrived for a in frames if fuzzed.fuzz_start - 1 <= a.arrived <= fuzzed.fuzz_end + 1]
    assert len(during) >= 10
    gaps = np.diff(during)
    assert gaps.max() < MAX_AUDIO_GAP, f"audio stalled for {gaps.max():.2f} s during the attack"
    warnings = [m for m in listener.messages if m["type"] == "warning" and "failed" in m["message"]]
    assert warnings == []


def test_the_server_logged_no_exception(fuzzed, live_server):
    bad = [line for line in live_server.output
           if "traceback" in line.lower() or "exception" in line.lower() or line.startswith(("ERROR", "CRITICAL"))]
    assert bad == [], "\n".join(live_server.output[-80:])
    assert live_server.process.poll() is None


def test_a_fresh_client_still_gets_its_state_echo(fuzzed):
    state = fuzzed.fresh_state
    assert state["type"] == "state", state
    assert state["cause"] == {"via": "websocket", "client_id": fuzzed.fresh_hello["client_id"], "id": "fresh-1"}
    assert state["version"] > fuzzed.fresh_hello["version"]
    assert state["state"]["directions"]["notes:G"]["coefficient"] == 0.25
    assert state["state"]["playback"] == "playing"


def _numbers(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from _numbers(v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


def test_the_state_never_took_an_invalid_value(fuzzed):
    state = fuzzed.final_state["state"]
    assert set(state["directions"]) <= set(KNOWN), state["directions"]
    assert state["directions"]["notes:G"]["coefficient"] == 0.25
    for control in state["directions"].values():
        assert math.isfinite(control["coefficient"]) and abs(control["coefficient"]) <= 1000
        assert isinstance(control["active"], bool)
    assert all(math.isfinite(x) for x in _numbers(state)), state
    assert 0 <= state["gate"]["p"] <= 1
    assert state["rows"] in ("both", "cond") and state["rule"] in ("add", "norm")
    sampling = state["sampling"]
    assert sampling["greedy"] or sampling["temperature"] > 0
    assert 0 <= sampling["top_p"] <= 1 and 0 <= sampling["guidance_scale"] <= 1000
    assert isinstance(state["prompt"], str) and len(state["prompt"]) <= 2000
    state["prompt"].encode("utf-8")  # valid Unicode
    # Every state the listener saw during the attack was valid too.
    for m in fuzzed.listener.messages:
        if m["type"] == "state":
            assert set(m["state"]["directions"]) <= set(KNOWN)
            assert all(math.isfinite(x) for x in _numbers(m["state"]))


def test_the_recording_made_during_the_attack_is_complete_and_replays(fuzzed, tiny):
    rec = fuzzed.recording
    audio, rate = read_wav(rec["wav"])
    header, states, end = read_log(rec["log"])
    hop = header["hop"]
    assert rate == fuzzed.listener.hello["sample_rate"]
    assert end is not None and end["frames"] == rec["frames"]
    first, last = rec["frames"]
    assert last - first >= 5 * 50  # the recording spans the attack (over 5 s)
    assert audio.shape[0] == end["samples"] == (last - first) * hop
    # The WAV holds what the listener heard (16-bit), from the recording's first frame on.
    heard = np.concatenate([a.pcm for a in fuzzed.listener.audio])
    assert np.abs(audio - heard[first * hop:last * hop]).max() <= 1.5 / 32767
    # The valid changes the attackers made are in the log, and replaying it gives the very same tokens.
    assert len(states) >= 2
    result = replay(rec["log"], model=tiny, progress=False)
    assert result.matches, (result.tokens_sha256, result.expected_sha256)


def test_costly_messages_were_refused_or_taken_and_memory_stayed_bounded(fuzzed):
    """Valid-but-costly input (ids beyond 64 bits, thousands of keyframes, long prompts due at one step,
    60 KB keys, OSC bundles of hundreds of messages) is refused or taken, never echoed in full, and the
    server's memory stays bounded."""
    costly = next(a for a in fuzzed.attackers if a.name == "costly")
    assert not costly.problems and costly.sent == len(costly.frames)
    assert all(len(e["message"]) <= 1000 for a in fuzzed.attackers for e in a.errors), "an error echoed its input"
    growth = fuzzed.rss.peak - fuzzed.rss.baseline
    assert growth <= MAX_RSS_GROWTH, f"the server grew by {growth / 2**20:.0f} MB during the attack"


def test_the_listener_heard_no_gap_longer_than_the_lead(fuzzed):
    """Played as it arrived, the listener's audio never fell silent for longer than MAX_SILENCE."""
    gaps = playback_gaps(fuzzed.listener.audio, fuzzed.listener.hello["sample_rate"])
    assert max(gaps) <= MAX_SILENCE, f"a {max(gaps):.2f} s silence (all silences: {sum(gaps):.2f} s)"
