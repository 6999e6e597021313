"""The fuzzer behind tests/server/test_fuzz.py and bench/bench_fuzz.py: seeded generators of malformed and
valid-but-costly WebSocket messages and OSC datagrams, the attackers that send them to a live server, and
what a run measures (the silences a listener would hear, the server's memory).

Nothing the attackers send may be a valid transport or record command for session "fuzz" (that would
legitimately interrupt the audio or the recording); everything else, valid `set`s included, is fair game.
"""

from __future__ import annotations

import json
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
from pythonosc.osc_message_builder import OscMessageBuilder

from live_client import LiveClient

SEED = 20261123
SESSION, OTHER_SESSION, OSC_SESSION = "fuzz", "fuzz-other", "fuzz-osc"
KNOWN = ("notes:C", "notes:G")  # the test bank's directions (conftest.py)
NAN, INF = float("nan"), float("inf")
PACE = 1 / 85  # seconds between two messages of a paced attacker: under the 100/s limit, so they get read

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


# --- valid but costly -----------------------------------------------------------------------------------


COSTLY_KINDS = ("huge_id", "keyframes", "max_keyframes", "prompts", "unknown_key", "long_key", "all")


def costly_message(rng: random.Random, n: int, binary: bool, kinds: tuple[str, ...] = COSTLY_KINDS) -> bytes | str:
    """A message that is well formed and costs the server something to take or to refuse: an id beyond 64
    bits, schedules with thousands of keyframes (or the most allowed), long prompts due at one step, a 60 KB
    unknown key, a 60 KB direction key, every direction at once."""
    kind = rng.choice(kinds)
    if kind == "huge_id":  # as JSON text (msgpack cannot carry it), also on a msgpack connection: the echo
        # of such an id once stopped a session whose other listener spoke msgpack
        return json.dumps({"type": "set", "id": rng.choice([2**64, 2**64 + n, -2**63 - 1, 10**30]), "prompt": "x"})
    if kind in ("keyframes", "max_keyframes"):
        count = rng.choice([1_000, 4_000]) if kind == "keyframes" else 64  # 4,000 points: ~60 KB, under a frame
        points = [[i * 10, round(rng.random(), 3)] for i in range(count)]
        keys = KNOWN[:1] if kind == "keyframes" else KNOWN
        message = {"type": "set", "id": f"k{n}", "directions": {
            key: {"coefficient": 0.2, "schedule": {"kind": "keyframes", "points": points}} for key in keys}}
        return _encode(message, binary)
    if kind == "prompts":  # long prompts, sent faster than steps run: those due at one step are encoded once
        return _encode({"type": "set", "id": f"p{n}", "prompt": rng.choice("qrs") * 300}, binary)
    if kind == "unknown_key":
        return _encode({"type": "set", "id": f"u{n}", "b" * 60_000: 1}, binary)
    if kind == "long_key":
        return _encode({"type": "set", "id": f"l{n}", "directions": {"notes:" + "As" * 30_000: {"coefficient": 1}}},
                       binary)
    return _encode({"type": "set", "id": f"a{n}", "directions": {k: {"coefficient": 0.1} for k in KNOWN}}, binary)


def costly_datagram(rng: random.Random) -> bytes:
    """An OSC datagram that costs: a 60 KB direction key, or a bundle of many messages."""
    s = f"/musicrfm/{SESSION}"
    if rng.random() < 0.5:
        return osc_message(s + "/direction/notes:" + "As" * rng.choice([1000, 15_000]) + "/coefficient", ("f", 0.5))
    inner = osc_message(s + "/gate", ("f", rng.random()))
    element = struct.pack(">i", len(inner)) + inner
    return b"#bundle\x00" + b"\x00" * 8 + element * rng.choice([50, 500])


def build_attack(seed: int = SEED, scale: float = 1.0, costly: int = 200,
                 costly_kinds: tuple[str, ...] = COSTLY_KINDS) -> tuple[list[Attacker], list[bytes]]:
    """The attack of one run: WebSocket attackers (malformed, bursts, oversize, far-future, costly) and OSC
    datagrams, drawn from `seed`. `scale` multiplies the malformed ones (1: ~6,000 messages in all)."""
    rng = random.Random(seed)
    n = iter(range(10**9))

    def count(k: int) -> int:
        return max(1, round(k * scale))

    attackers = [
        Attacker("text", SESSION, [ws_message(rng, next(n), binary=rng.random() < 0.15) for _ in range(count(700))]),
        Attacker("msgpack", SESSION, [ws_message(rng, next(n), binary=rng.random() < 0.85) for _ in range(count(700))],
                 encoding="msgpack"),
        Attacker("other", OTHER_SESSION, [ws_message(rng, next(n), binary=rng.random() < 0.5)
                                          for _ in range(count(700))]),
        Attacker("mixed", SESSION, [ws_message(rng, next(n), binary=rng.random() < 0.5) for _ in range(count(450))]),
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
        Attacker("costly", SESSION, [costly_message(rng, next(n), binary=True, kinds=costly_kinds) for _ in range(costly)],
                 encoding="msgpack", pace=1 / 20),
    ]
    datagrams = [osc_datagram(rng) for _ in range(count(3000))]
    datagrams += [costly_datagram(rng) for _ in range(max(1, costly // 10))]
    rng.shuffle(datagrams)
    return attackers, datagrams


# --- what a run measures --------------------------------------------------------------------------------


def playback_gaps(frames: list, sample_rate: int) -> list[float]:
    """The silences, in seconds, a player would have made playing `frames` (LiveClient audio, in order) as
    they arrived, with no buffer: it starts at the first frame's arrival and plays each frame when both the
    previous one has finished and this one is there. A stall of the server shows as one gap of its length
    (not as every later frame being late); a listener buffering B seconds hears only gaps longer than B."""
    gaps, clock = [], frames[0].arrived
    for a in frames:
        gaps.append(max(0.0, a.arrived - clock))
        clock = max(clock, a.arrived) + a.header.num_samples / sample_rate
    return gaps


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class RssSampler:
    """Samples a process's resident memory every `every` seconds on a thread, for a run's peak."""

    def __init__(self, pid: int, every: float = 0.1):
        self.pid, self.every = pid, every
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(rss_bytes(self.pid))
            except OSError:
                return
            self._stop.wait(self.every)

    def __enter__(self) -> "RssSampler":
        self.samples.append(rss_bytes(self.pid))
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    @property
    def baseline(self) -> int:
        return self.samples[0]

    @property
    def peak(self) -> int:
        return max(self.samples)


def run_attack(server, attackers: list[Attacker], datagrams: list[bytes], osc_seconds: float,
               timeout: float) -> tuple[float, int]:
    """Every attacker on its own thread and the OSC datagrams over `osc_seconds`; returns (seconds taken,
    datagrams sent)."""
    t0 = time.monotonic()
    threads = [threading.Thread(target=run_attacker, args=(server, a, t0 + timeout), daemon=True) for a in attackers]
    sent_osc: list[int] = []
    threads.append(threading.Thread(target=lambda: sent_osc.append(run_osc(server.osc_port, datagrams, osc_seconds)),
                                    daemon=True))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 20)
    return time.monotonic() - t0, (sent_osc[0] if sent_osc else 0)
