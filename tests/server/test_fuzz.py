"""Fuzzing a real `musicrfm serve` (tiny-random on CPU, the `live_server` fixture) through its public protocol.

A well-behaved client plays and records session "fuzz" while attackers on the same session (and on
another one) send thousands of malformed WebSocket messages, and thousands of malformed OSC datagrams go
to the OSC port. The server must answer and drop all of it: the listener's audio is never interrupted,
nothing in the server's output is a traceback, the state never takes an invalid value, the server still
answers a fresh client, and the recording made during the attack is complete and replays to the same
tokens. Everything the attackers send is drawn from a seeded RNG (deterministic).

Nothing the attackers send may be a valid transport or record command for session "fuzz" (that would
legitimately interrupt the audio or the recording); everything else, valid `set`s included, is fair game.
"""

from __future__ import annotations

import json
import math
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

import msgpack
import numpy as np
import pytest
from pythonosc.osc_message_builder import OscMessageBuilder

from musicrfm.engine.audio import read_wav
from musicrfm.server.recording import read_log, replay

from live_client import LiveClient, contiguity_problems

SEED = 20261123
SESSION, OTHER_SESSION, OSC_SESSION = "fuzz", "fuzz-other", "fuzz-osc"
KNOWN = ("notes:C", "notes:G")  # the test bank's directions (conftest.py)
NAN, INF = float("nan"), float("inf")
PACE = 1 / 85  # seconds between two messages of a paced attacker: under the 100/s limit, so they get read
# The liveness bound on the listener's audio: the longest wait between two audio frames during the attack.
# Measured on a 2-core box (generation at ~1-2x real time, 0.5 s generated ahead): at most 0.5 s, also with
# a CPU hog on one core; up to 1.35 s with both cores hogged. With the stall this test found (valid `set`s for
# far-future steps made every message cost more, until the event loop could not keep up): 2.9-3.7 s.
MAX_AUDIO_GAP = 2.0

# Values of every wrong kind, for every field.
JUNK = [None, True, False, 0, -1, 1, 7, 2**31, 2**63, -2**63, 2**64 - 1, 1e308, -1e308, 5e-324, 1e-300, 1e30, -0.0,
        0.5, 2.5, "", "x", "NaN", "Infinity", "-1", "\u0000", "\u00e9\u266b \u2713", "A" * 3000, [], [1, 2], [[[[]]]],
        {}, {"a": 1}, {"kind": "sine", "period": 1e-300}, {"mode": "topk"}, {"mode": "explicit", "weights": [1e308]},
        [NAN], {"p": INF}, NAN, INF, -INF]
JSON_ONLY = [10**400, -10**400]  # integers no float holds (msgpack cannot carry them)
SET_PATHS = [
    ("prompt",), ("directions",), ("directions", "notes:C"), ("directions", "notes:C", "coefficient"),
    ("directions", "notes:C", "schedule"), ("directions", "notes:C", "schedule", "length"),
    ("directions", "notes:C", "schedule", "kind"), ("directions", "notes:C", "active"),
    ("directions", "notes:C", "bogus"), ("directions", "notes:H"), ("directions", "notes:C#"), ("directions", ""),
    ("gate",), ("gate", "p"), ("gate", "seed"), ("gate", "bogus"), ("layers",), ("layers", "mode"),
    ("layers", "w0"), ("layers", "kappa"), ("rows",), ("rule",), ("sampling",), ("sampling", "guidance_scale"),
    ("sampling", "temperature"), ("sampling", "top_k"), ("sampling", "top_p"), ("sampling", "greedy"),
    ("sampling", "bogus"), ("seed",), ("at_step",), ("id",), ("bogus",), ("type",),
]
BAD_COMMANDS = [None, True, 0, 1, -1, 1.5, NAN, INF, "", "PLAY", "Stop", "pause ", "rewind", "start", "record", "\u0000",
                "x" * 500, [], ["play"], {"command": "stop"}]


# --- what the attackers send --------------------------------------------------------------------------


def _base_set(n: int) -> dict:
    return {"type": "set", "id": f"f{n}",
            "directions": {"notes:C": {"coefficient": 0.3, "schedule": {"kind": "fade_in", "length": 100}}},
            "gate": {"p": 0.5}, "layers": {"mode": "exponential", "kappa": 0.9}, "rows": "both", "rule": "add",
            "sampling": {"temperature": 1.0, "top_k": 100}}


def _put(message: dict, path: tuple, value) -> dict:
    node = message
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[path[-1]] = value
    return message


def _encode(message, binary: bool) -> bytes | str:
    if binary:
        return msgpack.packb(message, use_bin_type=True)
    return json.dumps(message)  # allow_nan: NaN, Infinity and -Infinity literals


def _deep(depth: int, binary: bool) -> bytes | str:
    if binary:  # fixarray of one element, nested `depth` times, around nil
        return b"\x82\xa4type\xa3set\xa6prompt" + b"\x91" * depth + b"\xc0"
    return '{"type": "set", "directions": ' + "[" * depth + "]" * depth + "}"


def ws_message(rng: random.Random, n: int, binary: bool) -> bytes | str:
    """One malformed (or, now and then, accidentally valid: a `set`, a `get`) client message."""
    kind = rng.choices(["set", "transport", "record", "type", "shape", "text", "bytes", "deep", "long",
                        "literal"], weights=[40, 10, 6, 5, 6, 5, 8, 4, 6, 10])[0]
    if kind == "set":  # one field of a valid set given a wrong value (or two)
        message = _base_set(n)
        for _ in range(rng.choice([1, 1, 2])):
            value = rng.choice(JUNK + ([] if binary else JSON_ONLY))
            _put(message, rng.choice(SET_PATHS), value)
        if message.get("type") != "set":
            message["type"] = rng.choice(["", "sett", "SET", "hack", 5])  # never transport / record
        return _encode(message, binary)
    if kind == "transport":  # the command is always wrong: nothing here may stop, pause or reset the stream
        message = {"type": "transport", "id": n, "command": rng.choice(BAD_COMMANDS)}
        for name in rng.sample(["seed", "at_step", "bogus", "id"], rng.randint(0, 2)):
            message[name] = rng.choice(JUNK)
        return _encode(message, binary)
    if kind == "record":  # likewise: never a valid start / stop
        message = {"type": "record", "id": n, "command": rng.choice(BAD_COMMANDS)}
        if rng.random() < 0.3:
            message["bogus"] = rng.choice(JUNK)
        return _encode(message, binary)
    if kind == "type":
        message = {"id": n, "type": rng.choice([None, 1, 2.5, "", "hello", "state", "error", "stats", "GET", "x" * 100,
                                                [], {"type": "set"}, NAN])}
        if rng.random() < 0.3:
            del message["type"]
        return _encode(message, binary)
    if kind == "shape":  # valid JSON / msgpack that is not an object
        return _encode(rng.choice([[], [1, 2, 3], ["set"], 0, -5, 1.5, "set", "", None, True,
                                        [{"type": "set"}], [[[]]], {"a": [{"b": {}}]}]), binary)
    if kind == "text":
        alphabet = '{}[]":,0123456789.eE+-truefalsnNaINfiy \\\n\t\u00e9\u2603'
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 200)))
        return text.encode() if binary else text
    if kind == "bytes":
        data = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 300)))
        return data if binary else data.decode("latin-1")
    if kind == "deep":
        return _deep(rng.choice([31, 33, 100, 500, 990, 1200, 5000]), binary)
    if kind == "long":
        size = rng.choice([2001, 10_000, 60_000])
        message = rng.choice([{"type": "set", "prompt": "p" * size},
                              {"type": "set", "id": "i" * 65, "prompt": "ok"},
                              {"type": "set", "directions": {"k" * size: {"coefficient": 0.1}}},
                              {"type": "set", "b" * size: 1},
                              {"type": "x" * size}])
        return _encode(message, binary)
    # literal: JSON text no encoder writes (non-finite literals, huge exponents, lone surrogates)
    literal = rng.choice([
        '{"type":"set","id":"L%d","directions":{"notes:C":{"coefficient":NaN}}}',
        '{"type":"set","id":"L%d","gate":{"p":Infinity}}',
        '{"type":"set","id":"L%d","sampling":{"temperature":-Infinity}}',
        '{"type":"set","id":"L%d","directions":{"notes:C":{"coefficient":1e400}}}',
        '{"type":"set","id":"L%d","directions":{"notes:C":{"coefficient":1e30}}}',
        '{"type":"set","id":"L%d","sampling":{"temperature":1e-320}}',
        '{"type":"set","id":"L%d","sampling":{"top_p":1e-300}}',
        '{"type":"set","id":"L%d","sampling":{"guidance_scale":1e300}}',
        '{"type":"set","id":"L%d","layers":"explicit:weights=1/2"}',
        '{"type":"set","id":"L%d","directions":{"notes:C":{"coefficient":0.5}},"layers":"all:w0=1e300"}',
        '{"type":"set","id":"L%d","directions":{"notes:C":{"coefficient":0.5,"schedule":"keyframes:0=1e300,9=0"}}}',
        '{"type":"set","id":"L%d","directions":{"notes:C":{"coefficient":0.5,"schedule":"sine:period=1e-300"}}}',
        '{"type":"set","id":"L%d","directions":{"notes:C":{"coefficient":0.5,"schedule":"logistic:center=1' + "0" * 400
        + '"}}}',
        '{"type":"set","id":"L%d","prompt":"\\ud800"}',
        '{"type":"set","id":"\\udfff%d","prompt":"y"}',
        '{"type":"set","id":"L%d","at_step":-5,"prompt":"y"}',
        '{"type":"set","id":"L%d","at_step":1.5,"prompt":"y"}',
        '{"type":"set","id":"L%d","at_step":99999999999999999999,"prompt":"y"}',
        '{"type":"transport","id":"L%d","command":"reset","seed":NaN}',
        '{"type":"set","id":"L%d","seed":1e400}',
    ]) % n
    return literal.encode() if binary else literal


def osc_string(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return data + b"\x00" * (4 - len(data) % 4)


def osc_message(address: str, *args: tuple[str, object]) -> bytes:
    builder = OscMessageBuilder(address=address)
    for tag, value in args:
        builder.add_arg(value, tag)
    return builder.build().dgram


def osc_datagram(rng: random.Random) -> bytes:
    """One malformed OSC datagram, or a well-formed message that is wrong (never a valid transport or record
    message for session "fuzz")."""
    s = f"/musicrfm/{SESSION}"
    kind = rng.choices(["bytes", "shaped", "tags", "wrong", "unknown", "bundle", "big"],
                       weights=[20, 10, 15, 40, 8, 6, 1])[0]
    if kind == "bytes":
        return bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 200)))
    if kind == "shaped":  # OSC-looking bytes: an address, unpadded or followed by junk
        junk = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 40)))
        return rng.choice([s.encode(), osc_string(s + "/play") + junk, b"/" + junk, osc_string(s) + b"," + junk,
                           b"#bundle" + junk, b"#bundle\x00" + junk])
    if kind == "tags":  # padded address, bad type tags
        address = rng.choice([s + "/gate", s + "/prompt", s + "/direction/notes:C/coefficient", s + "/play"])
        tags = rng.choice(["fff", ",zq", ",f", ",ffff", ",s", ",i\x01", ",[f]", ",b", ",iiiiiiiiiiii", ",\u00e9", ""])
        payload = bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 2, 4, 7])))
        return osc_string(address) + osc_string(tags) + payload
    if kind == "wrong":  # real addresses, wrong arguments
        nan_like = rng.choice([("f", NAN), ("f", INF), ("f", -INF), ("d", NAN), ("d", 1e308)])
        number = rng.choice([nan_like, ("s", "0.5"), ("i", 2), ("f", 1.5), ("f", -0.5), ("h", 2**40), ("f", 1e30)])
        choices = [
            (s + rng.choice(["/play", "/pause", "/stop", "/reset", "/sync"]),
             rng.choice([[("i", 1)], [("f", 0.0)], [("s", "now")], [("T", True)], [("i", 0), ("i", 0)]])),
            (s + "/prompt", rng.choice([[("i", 3)], [], [("s", "a"), ("s", "b")], [("f", NAN)]])),
            (s + "/gate", rng.choice([[number], [], [("s", "half")], [("f", 1.5)]])),
            (s + "/layers", rng.choice([[("f", 1.0)], [("s", "bogus")], [("s", "topk:k=0")], [("s", "all:w0=1e300")]])),
            (s + "/record", rng.choice([[("i", 2)], [("i", -1)], [("f", 0.5)], [("f", NAN)], [("s", "start")], []])),
            (s + "/sampling/temperature", rng.choice([[nan_like], [("f", -1.0)], [("f", 0.0)], [("s", "hot")], []])),
            (s + "/sampling/top_k", rng.choice([[("f", 5.0)], [("i", -5)], [("h", 2**40)], [("s", "k")]])),
            (s + "/sampling/top_p", rng.choice([[nan_like], [("f", 1.5)], [("f", -0.1)], [("d", 1e-300)]])),
            (s + "/sampling/guidance", rng.choice([[nan_like], [("f", -1.0)], [("f", 1e30)], [("s", "x")]])),
            (s + "/direction/notes:C/coefficient", rng.choice([[nan_like], [("s", "x")], [], [("f", 1e30)],
                                                                [("f", 0.1), ("f", 0.2)]])),
            (s + "/direction/notes:H/coefficient", [("f", 0.5)]),
            (s + "/direction/notes:C/knob", rng.choice([[("f", 1.5)], [("f", -0.5)], [nan_like], [("s", "x")]])),
            (s + "/direction/notes:C/active", rng.choice([[("i", 2)], [("s", "yes")], [("f", 0.5)], []])),
            (s + "/direction/notes:C/schedule", rng.choice([[("s", "bogus")], [("s", "sine:period=0")],
                                                             [("s", "keyframes:x=1")], [("f", 1.0)],
                                                             [("s", "linear_rise:length=-4")]])),
            (s + "/direction/notes:C/remove", [("i", 1)]),
            (f"/musicrfm/{OSC_SESSION}/direction/notes:C/coefficient", [nan_like]),
            (f"/musicrfm/{OSC_SESSION}/sync", rng.choice([[], [("i", 1)]])),
            ("/musicrfm/auth", rng.choice([[("s", "guess")], [("i", 1)]])),
        ]
        address, args = rng.choice(choices)
        return osc_message(address, *args)
    if kind == "unknown":
        address = rng.choice([s + "/bogus", s + "/direction/notes:C/bogus", s + "/sampling/bogus", s + "/direction",
                              s + "/direction//coefficient", "/x/y", "/musicrfm", "/musicrfm/", "/",
                              "/musicrfm/bad name!/play", "/musicrfm/" + "n" * 65 + "/play", s + "/play/now"])
        return osc_message(address, *rng.choice([[], [("f", 0.5)], [("s", "x")]]))
    if kind == "bundle":
        inner = osc_message(s + "/gate", ("f", NAN))
        element = struct.pack(">i", len(inner)) + inner
        return rng.choice([
            b"#bundle\x00" + b"\x00" * 8 + struct.pack(">i", 9999) + inner,          # size beyond the data
            b"#bundle\x00" + b"\x00" * 8 + struct.pack(">i", -4) + inner,            # negative size
            b"#bundle\x00" + b"\x00" * 7,                                            # truncated time tag
            b"#bundle\x00" + b"\x00" * 8 + element * 3,                              # fine, wrong messages
            _nested_bundle(inner, rng.choice([3, 9, 20])),                            # too deep
        ])
    return bytes(rng.getrandbits(8) for _ in range(60_000))  # big


def _nested_bundle(inner: bytes, depth: int) -> bytes:
    packet = inner
    for _ in range(depth):
        packet = b"#bundle\x00" + b"\x00" * 8 + struct.pack(">i", len(packet)) + packet
    return packet


# --- the run ------------------------------------------------------------------------------------------


@dataclass
class Attacker:
    name: str
    session: str
    frames: list  # what it sends, in order
    encoding: str = "json"
    pace: float | None = PACE  # None: all at once (a burst beyond the rate limit)
    closed_each: bool = False  # the server closes the connection after each frame (oversize)
    sent: int = 0
    errors: list = field(default_factory=list)  # the `error` messages it received
    closes: list = field(default_factory=list)  # close codes of its connections (oversize frames: 1009)
    frame_kinds: set = field(default_factory=set)  # str (JSON text) / bytes (msgpack): the control frames it got
    problems: list = field(default_factory=list)


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


def run_attacker(server, attacker: Attacker, stop_at: float) -> None:
    """Send every frame (on a new connection when the server closed the last one: oversize frames), then a
    sentinel, and wait for the sentinel's error: once it is there, everything sent before was handled."""
    client = None

    def connect() -> LiveClient:
        nonlocal client
        if client is not None:
            client.wait_closed(10)
            attacker.errors += [m for m in client.messages if m["type"] == "error"]
            attacker.frame_kinds |= {type(f) for f in client.control_frames}
            attacker.closes.append(client.closed.code if client.closed and client.closed.code != 1006 else None)
            client.close()
        client = LiveClient(server.ws_url(attacker.session, encoding=attacker.encoding))
        return client

    def send(frame) -> None:
        for _ in range(2):  # a connection the server is closing: once more on a new one
            if not client.alive:
                connect()
            try:
                client.send(frame)
                return
            except Exception:  # noqa: BLE001 - ConnectionClosed
                pass
        raise AssertionError("could not send on a fresh connection")

    try:
        connect()
        for frame in attacker.frames:
            if time.monotonic() > stop_at:
                raise AssertionError("ran out of time")
            send(frame)
            attacker.sent += 1
            if attacker.closed_each:
                assert client.wait_closed(10) is not None, "the server did not close the connection"
            if attacker.pace:
                time.sleep(attacker.pace)
        if not attacker.pace:
            time.sleep(2.5)  # let the rate limit's bucket refill, or the sentinel is dropped too
        send({"type": "sentinel", "id": f"done-{attacker.name}"})
        client.wait(lambda m: m["type"] == "error" and m.get("id") == f"done-{attacker.name}", timeout=30)
        attacker.errors += [m for m in client.messages if m["type"] == "error"]
        attacker.frame_kinds |= {type(f) for f in client.control_frames}
    except Exception as exc:  # noqa: BLE001 - reported by the test
        attacker.problems.append(f"{type(exc).__name__}: {exc}")
    finally:
        if client is not None:
            client.close()


def run_osc(port: int, datagrams: list[bytes], seconds: float) -> int:
    sent = 0
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))  # a real source address: the server's error replies go there (unread)
        batch = 25
        pause = seconds / (len(datagrams) / batch)
        for i in range(0, len(datagrams), batch):
            for j, data in enumerate(datagrams[i:i + batch]):
                try:
                    socks[j % 2].sendto(data, ("127.0.0.1", port))
                    sent += 1
                except OSError:
                    pass
            time.sleep(pause)
    finally:
        for sock in socks:
            sock.close()
    return sent


@pytest.fixture(scope="module")
def fuzzed(live_server) -> FuzzRun:
    rng = random.Random(SEED)
    n = iter(range(10**9))
    attackers = [
        Attacker("text", SESSION, [ws_message(rng, next(n), binary=rng.random() < 0.15) for _ in range(700)]),
        Attacker("msgpack", SESSION, [ws_message(rng, next(n), binary=rng.random() < 0.85) for _ in range(700)],
                 encoding="msgpack"),
        Attacker("other", OTHER_SESSION, [ws_message(rng, next(n), binary=rng.random() < 0.5) for _ in range(700)]),
        Attacker("mixed", SESSION, [ws_message(rng, next(n), binary=rng.random() < 0.5) for _ in range(450)]),
        Attacker("burst", SESSION, [json.dumps({"type": "set", "id": f"b{i}", "bogus": i}) for i in range(400)],
                 pace=None),
        Attacker("oversize", SESSION, [rng.choice(["x" * 70_000, json.dumps({"type": "set", "prompt": "p" * 70_000}),
                                                   bytes(70_000), msgpack.packb({"type": "set", "prompt": "q" * 70_000})])
                                       for _ in range(6)], pace=None, closed_each=True),
        # Valid sets for steps far ahead, each earlier than the last (out of step order, the costly kind):
        # they wait, and there is a bound on how many may (more are refused).
        Attacker("future", SESSION, [json.dumps({"type": "set", "id": f"u{i}", "at_step": 2**40 - 1 - i,
                                                 "directions": {"notes:G": {"coefficient": 0.1}}})
                                     for i in range(300)]),
    ]
    datagrams = [osc_datagram(rng) for _ in range(3000)]
    seconds: dict[str, float] = {}

    listener = LiveClient(live_server.ws_url(SESSION), keep_pcm=True)
    started = listener.request({"type": "transport", "command": "play", "id": "listen-play"})
    assert started["type"] == "state" and started["state"]["playback"] == "playing", started
    mark = listener.mark()
    listener.send({"type": "record", "command": "start", "id": "listen-rec"})
    listener.wait(lambda m: m["type"] == "recording" and m["status"] == "started", since=mark)
    listener.wait_audio(3)

    t0 = time.monotonic()
    threads = [threading.Thread(target=run_attacker, args=(live_server, a, t0 + 40), daemon=True) for a in attackers]
    sent_osc = []
    threads.append(threading.Thread(target=lambda: sent_osc.append(run_osc(live_server.osc_port, datagrams, 8.0)),
                                    daemon=True))
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    fuzz_end = time.monotonic()
    seconds["fuzz"] = fuzz_end - t0
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
    run = FuzzRun(listener, attackers, sent_osc[0] if sent_osc else 0, t0, fuzz_end, fresh_hello, fresh_state,
                  final_state, recording, seconds)
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
