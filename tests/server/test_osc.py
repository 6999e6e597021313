"""server/osc.py over real UDP: OSC packets in, protocol messages to the session, replies and echoes out.

The unit tests run an OscServer on 127.0.0.1:0 (its event loop in a background thread) against a fake
hub whose sessions record what `handle` receives; clients are plain UDP sockets bound to ephemeral ports
so they can receive the server's replies. `/musicrfm/S/sync` is the barrier: one sender's messages are
handled in order, so when the sync reply arrives everything sent before it has been handled.
The last test drives the real `musicrfm serve` (the `live_server` fixture of conftest.py).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import math
import socket
import struct
import threading
import time

import pytest
from pythonosc.osc_bundle_builder import IMMEDIATELY, OscBundleBuilder
from pythonosc.osc_message import OscMessage
from pythonosc.osc_message_builder import OscMessageBuilder
from pythonosc.osc_packet import OscPacket
from pythonosc.udp_client import SimpleUDPClient

from musicrfm.server.app import RELATIVE_KNOB_MAX
from musicrfm.server.osc import (MAX_BUNDLE_DEPTH, MESSAGE_BURST, MESSAGES_PER_SECOND, OscServer, float32_decimal,
                                 key_from_osc, key_to_osc, parse_packet)
from musicrfm.protocol.wire import ProtocolError

from live_client import LiveClient

KEYS = ["notes:C", "notes:C#", "notes:G", "chords:major", "chords:C#maj", "weird:Es", "weird:E#", "tempos:faster"]
COEFFICIENT_MAX = 2.0
TIMEOUT = 5.0


# --- fakes ------------------------------------------------------------------------------------------


class FakeSession:
    def __init__(self, name: str):
        self.name = name
        self.handled: list[tuple[dict, object]] = []
        self.callbacks: list = []
        self.version = 3
        self.state = {
            "playback": "playing", "prompt": "lofi", "gate": {"p": 0.3, "seed": 0},
            "directions": {"notes:C": {"coefficient": 0.45, "schedule": {"kind": "constant"}, "active": True}},
            "layers": {"mode": "exponential", "kappa": 0.95, "w0": 1.0}, "rows": "both", "rule": "add",
            "sampling": {"guidance_scale": 3.0, "temperature": 1.0, "top_k": 250, "top_p": 0.0, "greedy": False},
            "seed": 0,
        }

    async def handle(self, message: dict, cause) -> None:
        await asyncio.sleep(0)  # a real await: other senders' tasks may run in between
        for key in (message.get("directions") or {}):
            if key not in KEYS:
                raise ProtocolError(f"unknown direction {key!r}")
        if message.get("prompt") == "crash":
            raise RuntimeError("a bug in the session")
        self.handled.append((copy.deepcopy(message), cause))

    def subscribe(self, callback):
        self.callbacks.append(callback)
        return lambda: self.callbacks.remove(callback)

    def state_message(self) -> dict:
        return {"type": "state", "version": self.version, "epoch": 0, "step": 120, "state": copy.deepcopy(self.state),
                "cause": {"via": "websocket", "client_id": 1, "id": None}}

    def emit(self, message: dict) -> None:
        for callback in list(self.callbacks):
            callback(message)


class FakeHub:
    coefficient_max = COEFFICIENT_MAX
    directions = KEYS

    def __init__(self):
        self.sessions: dict[str, FakeSession] = {}

    def get_session(self, name: str) -> FakeSession:
        if name == "full":
            raise ProtocolError("too many sessions")
        if name not in self.sessions:
            self.sessions[name] = FakeSession(name)
        return self.sessions[name]


class Running:
    """An OscServer on 127.0.0.1:0 with its event loop in a background thread."""

    def __init__(self, **kwargs):
        self.hub = FakeHub()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = OscServer(self.hub, **kwargs)
        self.host, self.port = self.call(self.server.start("127.0.0.1", 0))

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(TIMEOUT)

    def on_loop(self, fn, *args):
        """Run fn(*args) on the server's loop thread and wait for it."""

        async def run():
            return fn(*args)

        return self.call(run())

    def session(self, name: str = "main") -> FakeSession:
        return self.hub.sessions[name]

    def close(self):
        self.on_loop(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT)
        self.loop.close()


@pytest.fixture
def osc():
    running = Running()
    yield running
    running.close()


def message(address: str, *args: tuple[str, object]) -> bytes:
    builder = OscMessageBuilder(address=address)
    for tag, value in args:
        builder.add_arg(value, tag)
    return builder.build().dgram


class Client:
    """A UDP socket on an ephemeral port: sends to the server, receives its replies."""

    def __init__(self, port: int, host: str = "127.0.0.1"):
        self.server = (host, port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(TIMEOUT)
        self.port = self.sock.getsockname()[1]
        self.id = f"127.0.0.1:{self.port}"

    def send_raw(self, data: bytes) -> None:
        self.sock.sendto(data, self.server)

    def send(self, address: str, *args: tuple[str, object]) -> None:
        self.send_raw(message(address, *args))

    def packet(self, timeout: float = TIMEOUT) -> list[tuple[str, list]] | None:
        """The next datagram as [(address, params)], or None after `timeout`."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return None
        return [(m.message.address, m.message.params) for m in OscPacket(data).messages]

    def until(self, predicate, timeout: float = TIMEOUT) -> list[tuple[str, list]]:
        """Datagrams until one satisfies predicate(messages); that one is returned."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            got = self.packet(max(left, 0.001)) if left > 0 else None
            if got is None:
                raise AssertionError("no matching OSC reply arrived")
            if predicate(got):
                return got

    def error(self, timeout: float = TIMEOUT) -> str:
        got = self.until(lambda ms: ms[0][0] == "/musicrfm/error", timeout)
        assert len(got) == 1 and len(got[0][1]) == 1
        return got[0][1][0]

    def sync(self, session: str = "main") -> list[tuple[str, list]]:
        """Barrier: everything sent before has been handled once this returns (the state bundle)."""
        self.send(f"/musicrfm/{session}/sync")
        return self.until(lambda ms: ms[0][0] == f"/musicrfm/{session}/version")

    def drain(self) -> list:
        out = []
        while (got := self.packet(0.05)) is not None:
            out.append(got)
        return out

    def close(self):
        self.sock.close()


@pytest.fixture
def client(osc):
    c = Client(osc.port)
    yield c
    c.close()


# --- pure functions ---------------------------------------------------------------------------------


def test_keys_sharps_written_as_s():
    assert key_from_osc("notes:Cs", KEYS) == "notes:C#"
    assert key_from_osc("notes:C", KEYS) == "notes:C"
    assert key_from_osc("chords:Csmaj", KEYS) == "chords:C#maj"
    assert key_from_osc("weird:Es", KEYS) == "weird:Es"          # the literal key exists: kept
    assert key_from_osc("tempos:faster", KEYS) == "tempos:faster"
    assert key_from_osc("notes:Gs", KEYS) == "notes:Gs"          # neither exists: as written (session refuses)
    assert key_from_osc("notes:Cs", []) == "notes:Cs"
    assert key_to_osc("notes:C#") == "notes:Cs" and key_to_osc("chords:major") == "chords:major"


def test_float32_values_read_as_their_shortest_decimal():
    def f32(x):
        return struct.unpack(">f", struct.pack(">f", x))[0]

    assert f32(0.4) != 0.4
    for x in (0.4, 0.3, -0.25, 1e-7, 123.456, 0.1, 2.0, 0.0, 3.4e38):
        assert float32_decimal(f32(x)) == x
    assert math.isnan(float32_decimal(float("nan")))


def test_parse_packet_keeps_bundle_order_and_refuses_malformed():
    inner = OscBundleBuilder(IMMEDIATELY)
    inner.add_content(OscMessage(message("/b", ("i", 2))))
    outer = OscBundleBuilder(123456)  # a time tag in the past: ignored, order kept
    outer.add_content(OscMessage(message("/a", ("f", 1.0))))
    outer.add_content(inner.build())
    outer.add_content(OscMessage(message("/c", ("s", "x"))))
    assert [(a, p) for a, _, p in parse_packet(outer.build().dgram)] == [("/a", [1.0]), ("/b", [2]), ("/c", ["x"])]
    # an element size of -4 would send a naive reader back to the size field, forever
    with pytest.raises(ValueError, match="element size"):
        parse_packet(b"#bundle\x00" + b"\x00" * 8 + struct.pack(">i", -4))
    deep = message("/x")
    for _ in range(MAX_BUNDLE_DEPTH + 1):
        deep = b"#bundle\x00" + b"\x00" * 8 + struct.pack(">i", len(deep)) + deep
    with pytest.raises(ValueError, match="nested"):
        parse_packet(deep)


# --- translations -----------------------------------------------------------------------------------

S = "/musicrfm/main"
TRANSLATIONS = [
    (f"{S}/play", [], {"type": "transport", "command": "play"}),
    (f"{S}/pause", [], {"type": "transport", "command": "pause"}),
    (f"{S}/stop", [], {"type": "transport", "command": "stop"}),
    (f"{S}/reset", [], {"type": "transport", "command": "reset"}),
    (f"{S}/prompt", [("s", "dark ambient drone")], {"type": "set", "prompt": "dark ambient drone"}),
    (f"{S}/direction/notes:C/coefficient", [("f", 0.4)], {"type": "set", "directions": {"notes:C": {"coefficient": 0.4}}}),
    (f"{S}/direction/notes:C/coefficient", [("f", -0.25)], {"type": "set", "directions": {"notes:C": {"coefficient": -0.25}}}),
    (f"{S}/direction/notes:C/coefficient", [("i", 1)], {"type": "set", "directions": {"notes:C": {"coefficient": 1.0}}}),
    (f"{S}/direction/notes:C/coefficient", [("d", 0.1234567891)],
     {"type": "set", "directions": {"notes:C": {"coefficient": 0.1234567891}}}),
    (f"{S}/direction/notes:Cs/coefficient", [("f", 0.6)], {"type": "set", "directions": {"notes:C#": {"coefficient": 0.6}}}),
    (f"{S}/direction/weird:Es/coefficient", [("f", 0.5)], {"type": "set", "directions": {"weird:Es": {"coefficient": 0.5}}}),
    (f"{S}/direction/chords:Csmaj/coefficient", [("f", 0.5)],
     {"type": "set", "directions": {"chords:C#maj": {"coefficient": 0.5}}}),
    (f"{S}/direction/notes:C/knob", [("f", 0.25)], {"type": "set", "directions": {"notes:C": {"coefficient": 0.5}}}),
    (f"{S}/direction/notes:C/knob", [("f", 0.3)], {"type": "set", "directions": {"notes:C": {"coefficient": 0.6}}}),
    (f"{S}/direction/notes:C/knob", [("i", 1)], {"type": "set", "directions": {"notes:C": {"coefficient": 2.0}}}),
    (f"{S}/direction/notes:C/knob", [("i", 0)], {"type": "set", "directions": {"notes:C": {"coefficient": 0.0}}}),
    # notes:C is in the session's state: only `active` changes
    (f"{S}/direction/notes:C/active", [("i", 0)], {"type": "set", "directions": {"notes:C": {"active": False}}}),
    (f"{S}/direction/notes:C/active", [("i", 1)], {"type": "set", "directions": {"notes:C": {"active": True}}}),
    (f"{S}/direction/notes:C/active", [("F", None)], {"type": "set", "directions": {"notes:C": {"active": False}}}),
    (f"{S}/direction/notes:C/active", [("f", 1.0)], {"type": "set", "directions": {"notes:C": {"active": True}}}),
    # notes:G is not: it is added at coefficient 0
    (f"{S}/direction/notes:G/active", [("T", None)],
     {"type": "set", "directions": {"notes:G": {"active": True, "coefficient": 0.0}}}),
    (f"{S}/direction/notes:C/schedule", [("s", "linear_rise:length=500")],
     {"type": "set", "directions": {"notes:C": {"schedule": {"kind": "linear_rise", "start": 0, "length": 500}}}}),
    (f"{S}/direction/notes:C/schedule", [("s", "constant")],
     {"type": "set", "directions": {"notes:C": {"schedule": {"kind": "constant"}}}}),
    (f"{S}/direction/notes:C/remove", [], {"type": "set", "directions": {"notes:C": None}}),
    (f"{S}/gate", [("f", 0.3)], {"type": "set", "gate": {"p": 0.3}}),
    (f"{S}/gate", [("i", 1)], {"type": "set", "gate": {"p": 1.0}}),
    (f"{S}/layers", [("s", "topk:k=8")], {"type": "set", "layers": "topk:k=8"}),
    (f"{S}/sampling/temperature", [("f", 0.9)], {"type": "set", "sampling": {"temperature": 0.9}}),
    (f"{S}/sampling/top_k", [("i", 100)], {"type": "set", "sampling": {"top_k": 100}}),
    (f"{S}/sampling/top_p", [("f", 0.5)], {"type": "set", "sampling": {"top_p": 0.5}}),
    (f"{S}/sampling/guidance", [("f", 3)], {"type": "set", "sampling": {"guidance_scale": 3.0}}),
    (f"{S}/sampling/guidance", [("i", 1)], {"type": "set", "sampling": {"guidance_scale": 1.0}}),
    (f"{S}/record", [("i", 1)], {"type": "record", "command": "start"}),
    (f"{S}/record", [("i", 0)], {"type": "record", "command": "stop"}),
    (f"{S}/record", [("T", None)], {"type": "record", "command": "start"}),
    ("/musicrfm/other-session_2/play", [], {"type": "transport", "command": "play"}),
]


def test_every_address_translates_to_its_protocol_message(osc, client):
    for address, args, expected in TRANSLATIONS:
        client.send(address, *args)
        session = address.split("/")[2]
        client.sync(session)
        handled = osc.session(session).handled
        assert handled, address
        got, cause = handled.pop()
        assert not handled, address
        assert got == expected, address
        for control in (got.get("directions") or {}).values():
            if control and "coefficient" in control:
                assert type(control["coefficient"]) is float, address
        assert (cause.via, cause.client_id, cause.id) == ("osc", client.id, None)
    assert client.drain() == []  # no error on the way


def test_simple_udp_client_and_type_inference(osc, client):
    """What a typical sender does: python-osc's SimpleUDPClient (floats -> f, ints -> i, bools -> T/F)."""
    sender = SimpleUDPClient("127.0.0.1", osc.port)
    sender._sock.bind(("127.0.0.1", 0))
    sender.send_message("/musicrfm/main/direction/notes:Cs/knob", 0.2)
    sender.send_message("/musicrfm/main/direction/notes:Cs/active", False)
    sender.send_message("/musicrfm/main/sync", [])
    sender._sock.settimeout(TIMEOUT)
    sender._sock.recv(65536)  # the state bundle: both were handled
    handled = [m for m, _ in osc.session().handled]
    assert handled == [{"type": "set", "directions": {"notes:C#": {"coefficient": 0.4}}},
                       {"type": "set", "directions": {"notes:C#": {"active": False, "coefficient": 0.0}}}]
    sender._sock.close()


def test_one_senders_messages_are_handled_in_order(osc, client):
    other = Client(osc.port)
    values = [round(0.01 * i, 2) for i in range(60)]
    for v in values:
        client.send(f"{S}/direction/notes:C/coefficient", ("f", v))
        other.send(f"{S}/direction/notes:G/coefficient", ("f", v))
    client.sync()
    other.sync()
    handled = osc.session().handled
    for c, key in ((client, "notes:C"), (other, "notes:G")):
        mine = [m["directions"][key]["coefficient"] for m, cause in handled if cause.client_id == c.id]
        assert mine == values
    other.close()


def test_bundles_apply_each_message_in_order(osc, client):
    inner = OscBundleBuilder(IMMEDIATELY)
    inner.add_content(OscMessage(message(f"{S}/direction/notes:C/knob", ("f", 0.5))))
    bundle = OscBundleBuilder(IMMEDIATELY)
    bundle.add_content(OscMessage(message(f"{S}/gate", ("f", 0.3))))
    bundle.add_content(inner.build())
    bundle.add_content(OscMessage(message(f"{S}/gate", ("s", "oops"))))  # refused on its own
    bundle.add_content(OscMessage(message(f"{S}/play")))
    client.send_raw(bundle.build().dgram)
    assert "gate" in client.error()
    client.sync()
    assert [m for m, _ in osc.session().handled] == [
        {"type": "set", "gate": {"p": 0.3}},
        {"type": "set", "directions": {"notes:C": {"coefficient": 1.0}}},
        {"type": "transport", "command": "play"},
    ]


def test_the_rate_limit_is_per_host_not_per_source_port(osc):
    """A flood from many source ports of one host is one flood: the host's bucket (MESSAGE_BURST at once, then
    MESSAGES_PER_SECOND) is shared by all its ports, so a third port gets no fresh allowance."""
    half = MESSAGE_BURST // 2
    flood = OscBundleBuilder(IMMEDIATELY)
    for i in range(half):
        flood.add_content(OscMessage(message(f"{S}/gate", ("f", round(i / half, 3)))))
    packet = flood.build().dgram
    senders = [Client(osc.port) for _ in range(3)]  # three source ports of 127.0.0.1
    try:
        assert len({c.port for c in senders}) == 3
        for c in senders:
            c.send_raw(packet)
        error = senders[2].error()
        assert "rate limit" in error and "one host" in error, error
        assert [c.packet(0.3) for c in senders[:2]] == [None, None]  # the first two were taken, unanswered
        time.sleep(2 * half / MESSAGES_PER_SECOND)  # the bucket refills at the host's rate ...
        senders[2].send_raw(packet)  # ... and the third port's next flood is taken
        senders[2].sync()
        gates = [m for m, cause in osc.session().handled if "gate" in m]
        assert len(gates) == 3 * half, len(gates)
    finally:
        for c in senders:
            c.close()


# --- errors -----------------------------------------------------------------------------------------

BAD = [
    (b"hello, not OSC", "not an OSC packet"),
    (b"", "empty"),
    (b"/musicrfm/main/gate", "malformed"),                      # no terminating NUL / padding
    (b"/musicrfm/main/gate\x00,i\x00\x00\x00\x01", "malformed"),       # truncated int
    (b"/musicrfm/main/gate\x00fff\x00", "','"),                      # type tags without the comma
    (b"/musicrfm/\xff\xfe\x00\x00", "malformed"),                # not UTF-8
    (message(f"{S}/gate", ("s", "0.3")), "number"),
    (message(f"{S}/gate", ("f", 0.3), ("f", 0.4)), "one argument"),
    (message(f"{S}/gate"), "one argument"),
    (message(f"{S}/gate", ("f", 1.5)), "outside [0, 1]"),
    (message(f"{S}/gate", ("f", float("nan"))), "NaN"),
    (message(f"{S}/direction/notes:C/coefficient", ("f", float("inf"))), "NaN"),
    (message(f"{S}/direction/notes:C/coefficient", ("d", float("-inf"))), "NaN"),
    (message(f"{S}/direction/notes:C/knob", ("f", 1.01)), "outside [0, 1]"),
    (message(f"{S}/direction/notes:C/knob", ("f", -0.1)), "outside [0, 1]"),
    (message(f"{S}/direction/notes:C/active", ("i", 2)), "1 or 0"),
    (message(f"{S}/direction/notes:C/active", ("f", 0.5)), "1 or 0"),
    (message(f"{S}/direction/notes:C/active", ("s", "k" * 5000)), "'kkkk"),  # quoted in part, with its length:
    (message(f"{S}/direction/notes:C/active", ("s", "k" * 5000)), "... (5002 characters)"),
    (message(f"{S}/direction/notes:C/schedule", ("s", "wobble:x=1")), "schedule"),
    (message(f"{S}/direction/notes:C/remove", ("i", 1)), "no arguments"),
    (message(f"{S}/direction/notes:H/coefficient", ("f", 0.4)), "unknown direction 'notes:H'"),
    (message(f"{S}/direction/notes:Gs/coefficient", ("f", 0.4)), "unknown direction 'notes:Gs'"),
    (message(f"{S}/direction//coefficient", ("f", 0.4)), "unknown OSC address"),
    (message(f"{S}/direction/notes:C/volume", ("f", 0.4)), "unknown OSC address"),
    (message(f"{S}/sampling/top_k", ("f", 100.0)), "integer"),
    (message(f"{S}/sampling/top_p", ("f", 2.0)), "outside [0, 1]"),
    (message(f"{S}/sampling/seed", ("i", 1)), "unknown OSC address"),
    (message(f"{S}/record", ("s", "on")), "1 or 0"),
    (message(f"{S}/play", ("i", 1)), "no arguments"),
    (message(f"{S}/prompt", ("i", 1)), "string"),
    (message(f"{S}/prompt", ("s", "crash")), "internal error"),
    (message(f"{S}/bogus"), "unknown OSC address"),
    (message(f"{S}"), "unknown OSC address"),
    (message("/other/thing", ("f", 1.0)), "unknown OSC address"),
    (message("/musicrfm/bad.name/play"), "bad session name"),
    (message("/musicrfm/full/play"), "too many sessions"),
    (message(f"{S}/gate", ("b", b"\x01\x02")), "unsupported OSC type tag"),
    (message(f"{S}/gate", ("m", (0, 1, 2, 3))), "unsupported OSC type tag"),
    (b"/musicrfm/main/gate\x00,[f]\x00\x00\x00\x00" + struct.pack(">f", 0.5), "unsupported OSC type tag"),  # array
    (b"#bundle\x00" + b"\x00" * 8 + struct.pack(">i", -4), "element size"),
    (b"#bundle\x00" + b"\x00" * 8 + struct.pack(">i", 400) + message(f"{S}/play"), "element size"),
    (b"#bundle\x00\x00\x00", "truncated"),
]


def test_errors_are_answered_and_ignored(osc, client):
    client.send(f"{S}/direction/notes:C/coefficient", ("f", 0.1))
    client.sync()
    for data, text in BAD:
        client.send_raw(data)
        assert text in client.error(), (data, text)
    client.sync()
    handled = [m for m, _ in osc.session().handled]
    assert handled == [{"type": "set", "directions": {"notes:C": {"coefficient": 0.1}}}]
    assert "full" not in osc.hub.sessions
    client.send(f"{S}/gate", ("f", 0.5))  # still serving
    client.sync()
    assert osc.session().handled[-1][0] == {"type": "set", "gate": {"p": 0.5}}


def test_oversize_datagram_is_refused_unread(osc, client):
    # A UDP/IPv4 datagram cannot exceed 65507 bytes, so hand the 64 KiB + 1 packet to the protocol
    # object directly (the error still goes back over the socket).
    protocol = osc.server.transport.get_protocol()
    data = message(f"{S}/prompt", ("s", "x" * 65536))
    assert len(data) > 65536
    osc.on_loop(protocol.datagram_received, data, ("127.0.0.1", client.port))
    assert "refused" in client.error()
    client.sync()
    assert osc.session().handled == []
    small = Running(max_datagram_bytes=64)  # and over a real socket, with a small limit
    try:
        c = Client(small.port)
        c.send(f"{S}/prompt", ("s", "x" * 100))
        assert "at most 64" in c.error()
        c.close()
    finally:
        small.close()


def test_datagram_received_never_raises(osc, client):
    protocol = osc.server.transport.get_protocol()
    for data in (b"\x00" * 4, b"#bundle", b"/" * 7, bytes(range(256)), None):
        osc.on_loop(protocol.datagram_received, data, ("127.0.0.1", client.port))  # raises here if it raised


def test_warnings_are_logged_and_rate_limited(osc, client, caplog):
    caplog.set_level(logging.WARNING, logger="musicrfm.osc")
    for _ in range(100):
        client.send_raw(b"garbage")
        client.send_raw(b"/musicrfm/main/gate\x00,x\x00\x00")  # python-osc would warn on the root logger
    client.send(f"{S}/gate", ("f", 0.5))
    client.sync()
    mine = [r for r in caplog.records if r.name == "musicrfm.osc"]
    assert 1 <= len(mine) <= 25
    assert "not an OSC packet" in mine[0].getMessage()
    assert all(r.name == "musicrfm.osc" for r in caplog.records if r.levelno >= logging.WARNING)


# --- echo -------------------------------------------------------------------------------------------


def state(version: int, directions: dict, **extra) -> dict:
    s = FakeSession("x").state
    s["directions"] = directions
    s.update(extra)
    return {"type": "state", "version": version, "epoch": 1, "step": 4410, "state": s,
            "cause": {"via": "osc", "client_id": "127.0.0.1:1", "id": None}}


def test_state_changes_are_echoed_as_a_bundle_to_every_sender(osc, client):
    other, silent = Client(osc.port), Client(osc.port)
    client.send(f"{S}/gate", ("f", 0.3))
    other.send(f"{S}/play")
    client.sync(), other.sync()
    client.drain(), other.drain()
    msg = state(13, {"notes:C#": {"coefficient": 0.5, "schedule": {"kind": "constant"}, "active": False},
                     "notes:G": {"coefficient": 3.0, "schedule": {"kind": "constant"}, "active": True},
                     "chords:major": {"coefficient": -0.5, "schedule": {"kind": "constant"}, "active": True}},
                prompt="dark drone", playback="paused")
    osc.on_loop(osc.session().emit, msg)
    osc.on_loop(osc.session().emit, {"type": "stats", "step": 1})  # not echoed
    expected = [
        ("/musicrfm/main/version", [13]),
        ("/musicrfm/main/step", [4410]),
        ("/musicrfm/main/playback", ["paused"]),
        ("/musicrfm/main/prompt", ["dark drone"]),
        ("/musicrfm/main/gate", [pytest.approx(0.3)]),
        ("/musicrfm/main/direction/notes:Cs/coefficient", [0.5]),
        ("/musicrfm/main/direction/notes:Cs/knob", [0.25]),          # coefficient / coefficient_max
        ("/musicrfm/main/direction/notes:Cs/active", [0]),
        ("/musicrfm/main/direction/notes:G/coefficient", [3.0]),
        ("/musicrfm/main/direction/notes:G/knob", [1.0]),            # clipped to the knob's range
        ("/musicrfm/main/direction/notes:G/active", [1]),
        ("/musicrfm/main/direction/chords:major/coefficient", [-0.5]),
        ("/musicrfm/main/direction/chords:major/knob", [0.0]),
        ("/musicrfm/main/direction/chords:major/active", [1]),
    ]
    for c in (client, other):
        got = c.packet()
        assert got == expected
        assert [type(p[0]) for _, p in got] == [int, int, str, str, float] + [float, float, int] * 3
        assert c.packet(0.2) is None
    assert silent.packet(0.2) is None
    # the sync reply is the same bundle, for the session's current state
    synced = client.sync()
    assert synced[:5] == [("/musicrfm/main/version", [3]), ("/musicrfm/main/step", [120]),
                          ("/musicrfm/main/playback", ["playing"]), ("/musicrfm/main/prompt", ["lofi"]),
                          ("/musicrfm/main/gate", [pytest.approx(0.3)])]
    assert synced[5:] == [("/musicrfm/main/direction/notes:C/coefficient", [pytest.approx(0.45)]),
                          ("/musicrfm/main/direction/notes:C/knob", [pytest.approx(0.225)]),
                          ("/musicrfm/main/direction/notes:C/active", [1])]
    assert other.packet(0.2) is None  # a sync answers its sender only
    other.close(), silent.close()


def test_echo_only_to_the_sessions_recent_senders():
    osc = Running(echo_seconds=1.0)
    try:
        a, b = Client(osc.port), Client(osc.port)
        a.send(f"{S}/play")
        b.send("/musicrfm/other/play")
        a.sync(), b.sync("other")
        msg = state(5, {})
        osc.on_loop(osc.session().emit, msg)
        assert a.packet()[0] == ("/musicrfm/main/version", [5])
        assert b.packet(0.2) is None  # b talks to another session
        time.sleep(1.2)
        osc.on_loop(osc.session().emit, msg)
        assert a.packet(0.3) is None  # a has been silent longer than echo_seconds
        a.send(f"{S}/pause")
        a.sync()
        osc.on_loop(osc.session().emit, msg)
        assert a.packet()[0] == ("/musicrfm/main/version", [5])
        a.close(), b.close()
    finally:
        osc.close()


def test_large_states_are_split_into_several_bundles(osc, client):
    directions = {f"concept{i:02d}:class_with_a_rather_long_name_{i:02d}":
                  {"coefficient": 0.1, "schedule": {"kind": "constant"}, "active": True} for i in range(64)}
    client.send(f"{S}/play")
    client.sync()
    osc.on_loop(osc.session().emit, state(9, directions))
    messages = []
    while (got := client.packet(0.3)) is not None:
        messages += got
    assert len(messages) == 5 + 3 * 64
    assert messages[0] == ("/musicrfm/main/version", [9])
    assert [a for a, _ in messages[5:8]] == [f"/musicrfm/main/direction/concept00:class_with_a_rather_long_name_00/{x}"
                                             for x in ("coefficient", "knob", "active")]


# --- security ---------------------------------------------------------------------------------------


def test_a_token_is_required_off_loopback():
    async def start(host, token):
        server = OscServer(FakeHub(), token=token)
        try:
            return await server.start(host, 0)
        finally:
            server.close()

    with pytest.raises(ValueError, match="token"):
        asyncio.run(start("0.0.0.0", None))
    with pytest.raises(ValueError, match="token"):
        asyncio.run(start("192.168.1.20", None))
    assert asyncio.run(start("localhost", None))[1] > 0


def test_auth():
    osc = Running(token="s3cret")
    try:
        a, b = Client(osc.port), Client(osc.port)
        a.send(f"{S}/play")
        assert "not authorised" in a.error()
        a.send("/musicrfm/auth", ("s", "guess"))
        assert "wrong token" in a.error()
        a.send("/musicrfm/auth", ("i", 1))
        assert "wrong token" in a.error()
        a.send("/musicrfm/auth", ("s", "s3cret"))
        a.send(f"{S}/play")
        a.sync()
        assert [m for m, _ in osc.session().handled] == [{"type": "transport", "command": "play"}]
        b.send(f"{S}/stop")  # another port of the same host is another sender
        assert "not authorised" in b.error()
        bundle = OscBundleBuilder(IMMEDIATELY)  # auth then a message, in one bundle
        bundle.add_content(OscMessage(message("/musicrfm/auth", ("s", "s3cret"))))
        bundle.add_content(OscMessage(message(f"{S}/stop")))
        b.send_raw(bundle.build().dgram)
        b.sync()
        assert [m for m, _ in osc.session().handled][-1] == {"type": "transport", "command": "stop"}
        a.close(), b.close()
    finally:
        osc.close()


# --- the real server --------------------------------------------------------------------------------


def test_live_server_osc_changes_what_websocket_clients_see(live_server):
    """`musicrfm serve` (tiny-random model, a bank with notes:C and notes:G): an OSC packet changes the
    state that a WebSocket client of the session sees, and the OSC sender gets the echo bundle; a change
    made over the WebSocket is echoed to the OSC sender too."""
    def coefficient(msg: dict, key: str):
        return ((msg.get("state") or {}).get("directions") or {}).get(key, {}).get("coefficient")

    with LiveClient(live_server.ws_url("main")) as ws:
        assert ws.hello["type"] == "hello"
        mark = ws.mark()
        osc_client = Client(live_server.osc_port)
        osc_client.send("/musicrfm/main/direction/notes:C/coefficient", ("f", 0.4))
        msg = ws.wait(lambda m: m["type"] == "error" or (m["type"] == "state" and coefficient(m, "notes:C") == 0.4),
                      since=mark, timeout=60)
        assert msg["type"] != "error", msg
        assert msg["cause"]["via"] == "osc" and msg["cause"]["client_id"] == osc_client.id
        echo = dict(osc_client.until(lambda ms: ms[0][0] == "/musicrfm/main/version", timeout=30))
        assert echo["/musicrfm/main/version"] == [msg["version"]]
        assert echo["/musicrfm/main/step"] == [msg["step"]]
        assert echo["/musicrfm/main/playback"] == [msg["state"]["playback"]]
        assert echo["/musicrfm/main/direction/notes:C/coefficient"] == [pytest.approx(0.4)]
        assert echo["/musicrfm/main/direction/notes:C/knob"] == [pytest.approx(0.4 / RELATIVE_KNOB_MAX)]
        assert echo["/musicrfm/main/direction/notes:C/active"] == [1]

        ws.send({"type": "set", "directions": {"notes:G": {"coefficient": 0.25}}})
        echo = dict(osc_client.until(lambda ms: ("/musicrfm/main/direction/notes:G/coefficient", [0.25]) in ms,
                                     timeout=30))
        assert echo["/musicrfm/main/direction/notes:C/coefficient"] == [pytest.approx(0.4)]

        osc_client.send("/musicrfm/main/direction/notes:H/coefficient", ("f", 0.4))
        assert "notes:H" in osc_client.error(timeout=30)
        osc_client.close()
    logged = time.monotonic() + 10  # the server logged the refusal (its output is read by a thread)
    while not any("musicrfm.osc" in line and "notes:H" in line for line in live_server.output):
        assert time.monotonic() < logged, "\n".join(live_server.output)
        time.sleep(0.05)
    assert not [line for line in live_server.output if "Traceback" in line]
