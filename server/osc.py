"""OSC over UDP (docs/protocol.md, "OSC"): a control surface's messages -> the session's protocol messages.

Every datagram is parsed here (python-osc only decodes the argument values and builds the replies; its
server classes are not used), translated to the same message dict a WebSocket client would send
(`{"type": "set", ...}`, `transport`, `record`) and handed to `Session.handle` with an OSC `Cause`. The
messages of one sender are handled one after another in the order they arrived. Anything wrong (a
malformed packet, an unknown address, a wrong type tag or argument count, NaN, an unknown direction) is
logged, rate-limited, answered with `/musicrfm/error s:<text>` to the sender, and ignored: nothing here
raises out of `datagram_received`.

Every address that sent a session a message in the last `echo_seconds` receives the session's state as an
OSC bundle after each change (and on `/musicrfm/S/sync`).

Security: OSC has no connections, so a server bound to anything but loopback needs a token; a sender
proves it with `/musicrfm/auth s:<token>` from the (ip, port) it then uses. Bundle time tags are ignored
(messages apply at once, in order); `at_step` of the WebSocket protocol has no OSC form.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import logging
import math
import re
import struct
import time
from typing import Any, Callable

from pythonosc import osc_bundle_builder, osc_message_builder
from pythonosc.osc_message import OscMessage
from pythonosc.parsing import osc_types

from musicrfm.protocol.fields import shown
from musicrfm.protocol.wire import MAX_MESSAGE_BYTES, ProtocolError, is_loopback, valid_session_name

from .limits import RateLimitedLog, TokenBucket
from .state import MAX_DIRECTION_KEY_CHARS, check_schedule_points
from .stream import Cause

log = logging.getLogger("musicrfm.osc")

PREFIX = "musicrfm"
ERROR_ADDRESS = "/musicrfm/error"
AUTH_ADDRESS = "/musicrfm/auth"
MAX_DATAGRAM_BYTES = MAX_MESSAGE_BYTES  # larger datagrams are dropped unread
MAX_BUNDLE_DEPTH = 8                    # nested bundles deeper than this are refused
MAX_PENDING_PER_SENDER = 256            # messages of one sender waiting for the session; more are refused
MAX_LISTENERS = 256                     # echo addresses kept per session (the least recent go first)
MAX_ERROR_TEXT = 1000                   # characters of an /musicrfm/error reply
MAX_REPLY_BYTES = 8192                  # echo bundles are split so that each datagram stays below this
ERROR_REPLIES_PER_SECOND = 50           # /musicrfm/error replies, all senders together (bursts of 100):
                                        # a flood of bad (or source-spoofed) packets is not reflected
MESSAGES_PER_SECOND = 100               # messages one sending host (IP address, whatever its source ports) may send,
MESSAGE_BURST = 200                     # a bundle counting its messages; over that, a datagram is refused whole (as a
                                        # WebSocket client's are). Per IP, not ip:port: a new source port is free
MAX_RATE_SENDERS = 1024                 # hosts whose rate is remembered (the least recent are forgotten)
_BUNDLE_TAG = b"#bundle\x00"
_ARG_TAGS = frozenset("ifdhsTFN")       # argument types accepted at all (others: a clear error)

Address = tuple[str, int]


class OscError(ValueError):
    """A packet or message this server refuses; the text is sent back to the sender."""


# --- parsing ----------------------------------------------------------------------------------------


def parse_packet(data: bytes) -> list[tuple[str, str, list[Any]]]:
    """A datagram -> its messages in order, each (address, type tags, arguments); bundles are flattened
    depth-first in their written order and their time tags ignored. OscError for anything malformed: a
    packet is either read whole or refused whole."""
    out: list[tuple[str, str, list[Any]]] = []
    _parse_element(bytes(data), out, 0)
    return out


def _parse_element(data: bytes, out: list, depth: int) -> None:
    if data.startswith(_BUNDLE_TAG):
        _parse_bundle(data, out, depth)
    elif data.startswith(b"/"):
        out.append(_parse_message(data))
    elif not data:
        raise OscError("empty OSC packet")
    else:
        raise OscError("not an OSC packet (neither a message starting with '/' nor a #bundle)")


def _parse_bundle(data: bytes, out: list, depth: int) -> None:
    if depth >= MAX_BUNDLE_DEPTH:
        raise OscError(f"OSC bundles nested deeper than {MAX_BUNDLE_DEPTH} levels")
    index = len(_BUNDLE_TAG) + 8  # the 64-bit time tag: ignored, everything applies at once
    if len(data) < index:
        raise OscError("truncated OSC bundle (no time tag)")
    while index < len(data):
        if index + 4 > len(data):
            raise OscError("truncated OSC bundle element size")
        (size,) = struct.unpack_from(">i", data, index)
        index += 4
        if size <= 0 or size % 4 or index + size > len(data):
            raise OscError(f"bad OSC bundle element size {size}")
        _parse_element(data[index:index + size], out, depth + 1)
        index += size


def _parse_message(data: bytes) -> tuple[str, str, list[Any]]:
    try:
        address, index = osc_types.get_string(data, 0)
        tags = ""
        if index < len(data):
            tags, index = osc_types.get_string(data, index)
            if not tags.startswith(","):
                raise OscError(f"{shown(address)}: the type tag string must start with ',', got {shown(tags, 40)}")
            tags = tags[1:]
    except OscError:
        raise
    except Exception as exc:  # osc_types.ParseError, UnicodeDecodeError, ...
        raise OscError(f"malformed OSC message: {exc}") from None
    unknown = sorted(set(tags) - _ARG_TAGS)
    if unknown:  # checked before python-osc sees them: it logs unknown tags on the root logger
        raise OscError(f"{shown(address)}: unsupported OSC type tag(s) {shown(''.join(unknown), 40)}; use i, f, s "
                       "(or T/F)")
    try:
        params = OscMessage(data).params
    except Exception as exc:
        raise OscError(f"{shown(address)}: malformed OSC arguments: {exc}") from None
    if len(params) != len(tags):
        raise OscError(f"{shown(address)}: type tags ,{tags} but {len(params)} argument(s) could be read")
    return address, tags, params


def float32_decimal(value: float) -> float:
    """The shortest decimal that rounds to the same float32: a surface's 0.4 (0.4000000059604645 once
    widened to a double) reaches the session as 0.4."""
    if not math.isfinite(value):
        return value
    for digits in range(1, 10):
        candidate = float(f"{value:.{digits}g}")
        try:
            if struct.unpack(">f", struct.pack(">f", candidate))[0] == value:
                return candidate
        except OverflowError:
            break
    return value


# --- direction keys ---------------------------------------------------------------------------------

_SHARP_S = re.compile(r"(?<=[A-G])s")


def key_to_osc(key: str) -> str:
    """'notes:C#' -> 'notes:Cs' ('#' is not allowed in OSC addresses)."""
    return key.replace("#", "s")


def key_from_osc(text: str, directions: Any) -> str:
    """A KEY written in an address -> the direction key: the literal text if the banks hold it, else the
    text with an 's' after a note letter A-G (in the class part) read as '#', when that key exists: every such
    's' first, else just one of them (the first that makes a known key). Unresolved keys are returned as
    written (the session names the unknown direction).

    Linear in the text (times the bank's keys): a 60 KB key of 'AsAsAs...' once took seconds and gigabytes,
    when every one-'#' candidate was built. Callers bound the length too (MAX_DIRECTION_KEY_CHARS)."""
    known = directions if isinstance(directions, (set, frozenset, dict)) else set(directions or ())
    if text in known or ":" not in text:
        return text
    concept, _, cls = text.partition(":")
    spots = {m.start() for m in _SHARP_S.finditer(cls)}
    if not spots:
        return text
    every = f"{concept}:" + "".join("#" if i in spots else c for i, c in enumerate(cls))
    if every in known:
        return every
    # One 's' read as '#': a known key with a single '#', at one of the spots, and the text elsewhere.
    head = len(concept) + 1
    found = [(k.index("#") - head, k) for k in known
             if len(k) == len(text) and k.count("#") == 1 and k.index("#") - head in spots and key_to_osc(k) == text]
    return min(found)[1] if found else text


# --- arguments --------------------------------------------------------------------------------------


def _describe(tags: str) -> str:
    return f",{tags}" if tags else "no arguments"


def _no_args(address: str, tags: str) -> None:
    if tags:
        raise OscError(f"{address} takes no arguments, got {_describe(tags)}")


def _one(address: str, tags: str, params: list, expected: str) -> tuple[str, Any]:
    if len(tags) != 1:
        raise OscError(f"{address} takes one argument ({expected}), got {_describe(tags)}")
    return tags, params[0]


def _float_arg(address: str, tags: str, params: list, lo: float | None = None, hi: float | None = None) -> float:
    tag, value = _one(address, tags, params, "f")
    if tag not in "fdih":
        raise OscError(f"{address} takes a number (f or i), got type tag {tag!r}")
    value = float(value)
    if not math.isfinite(value):
        raise OscError(f"{address}: {value} is not a number the protocol allows (NaN and infinities are refused)")
    if tag == "f":
        value = float32_decimal(value)
    if lo is not None and not lo <= value <= hi:
        raise OscError(f"{address}: {value} is outside [{lo:g}, {hi:g}]")
    return value


def _int_arg(address: str, tags: str, params: list) -> int:
    tag, value = _one(address, tags, params, "i")
    if tag not in "ih":
        raise OscError(f"{address} takes an integer (i), got type tag {tag!r}")
    return int(value)


def _bool_arg(address: str, tags: str, params: list) -> bool:
    """i 0/1, the OSC booleans T/F, or f 0.0/1.0 (what many surfaces' toggle buttons send)."""
    tag, value = _one(address, tags, params, "i 0/1")
    if tag in "TF":
        return tag == "T"
    if tag in "ihfd" and value in (0, 1):  # NaN compares unequal to both
        return bool(value)
    raise OscError(f"{address} takes 1 or 0 (i, or T/F), got {shown(value)} ({tag})")


def _str_arg(address: str, tags: str, params: list) -> str:
    tag, value = _one(address, tags, params, "s")
    if tag != "s":
        raise OscError(f"{address} takes a string (s), got type tag {tag!r}")
    return value


def _schedule(address: str, text: str) -> dict:
    from musicrfm.engine.steering import Schedule  # imports torch: only when a schedule is actually sent

    try:
        check_schedule_points(f"{address} schedule", text)  # before parsing: counting is cheap
        return Schedule.parse(text).to_dict()
    except (ValueError, TypeError, ProtocolError) as exc:
        raise OscError(str(exc) if isinstance(exc, ProtocolError) else f"{address}: {exc}") from None


# --- translation ------------------------------------------------------------------------------------

_TRANSPORT = ("play", "pause", "stop", "reset")
_SAMPLING = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "guidance": "guidance_scale"}
_DIRECTION_FIELDS = ("coefficient", "knob", "active", "schedule", "remove")


class Action:
    """One translated message: the protocol message for the session (or a sync), to run in order."""

    __slots__ = ("session", "message", "new_at_zero", "sync")

    def __init__(self, session: str, message: dict | None = None, *, new_at_zero: str | None = None,
                 sync: bool = False):
        self.session = session
        self.message = message
        self.new_at_zero = new_at_zero  # /active of a direction: add it at coefficient 0 if it is new
        self.sync = sync

    def __repr__(self) -> str:
        return f"Action({self.session!r}, {self.message!r}, new_at_zero={self.new_at_zero!r}, sync={self.sync})"


def translate(address: str, tags: str, params: list, *, directions: Any, coefficient_max: float) -> Action:
    """An OSC message of a session (`/musicrfm/SESSION/...`) -> an Action; OscError if it is not one of
    the addresses of docs/protocol.md or its arguments are wrong."""
    parts = address.split("/")
    if len(parts) < 4 or parts[0] != "" or parts[1] != PREFIX:
        raise OscError(f"unknown OSC address {shown(address)}; addresses are /musicrfm/SESSION/...")
    session, rest = parts[2], parts[3:]
    if not valid_session_name(session):
        raise OscError(f"bad session name {shown(session)} (letters, digits, '-', '_', at most 64)")
    head = rest[0]

    def set_(**fields: Any) -> Action:
        return Action(session, {"type": "set", **fields})

    if len(rest) == 1:
        if head in _TRANSPORT:
            _no_args(address, tags)
            return Action(session, {"type": "transport", "command": head})
        if head == "sync":
            _no_args(address, tags)
            return Action(session, sync=True)
        if head == "prompt":
            return set_(prompt=_str_arg(address, tags, params))
        if head == "gate":
            return set_(gate={"p": _float_arg(address, tags, params, 0.0, 1.0)})
        if head == "layers":
            return set_(layers=_str_arg(address, tags, params))
        if head == "record":
            on = _bool_arg(address, tags, params)
            return Action(session, {"type": "record", "command": "start" if on else "stop"})
    elif len(rest) == 2 and head == "sampling" and rest[1] in _SAMPLING:
        name = rest[1]
        if name == "top_k":
            value: Any = _int_arg(address, tags, params)
        elif name == "top_p":
            value = _float_arg(address, tags, params, 0.0, 1.0)
        else:
            value = _float_arg(address, tags, params)
        return set_(sampling={_SAMPLING[name]: value})
    elif len(rest) == 3 and head == "direction" and rest[2] in _DIRECTION_FIELDS and rest[1]:
        if len(rest[1]) > MAX_DIRECTION_KEY_CHARS:
            raise OscError(f"direction key {shown(rest[1])} is too long (at most {MAX_DIRECTION_KEY_CHARS} "
                           "characters)")
        key = key_from_osc(rest[1], directions)
        what = rest[2]
        if what == "coefficient":
            return set_(directions={key: {"coefficient": _float_arg(address, tags, params)}})
        if what == "knob":
            knob = _float_arg(address, tags, params, 0.0, 1.0)
            return set_(directions={key: {"coefficient": float(f"{knob * coefficient_max:.12g}")}})
        if what == "active":
            on = _bool_arg(address, tags, params)
            return Action(session, {"type": "set", "directions": {key: {"active": on}}}, new_at_zero=key)
        if what == "schedule":
            return set_(directions={key: {"schedule": _schedule(address, _str_arg(address, tags, params))}})
        _no_args(address, tags)  # remove
        return set_(directions={key: None})
    raise OscError(f"unknown OSC address {shown(address)}")


# --- replies ----------------------------------------------------------------------------------------


def build_message(address: str, *args: tuple[str, Any]) -> bytes:
    builder = osc_message_builder.OscMessageBuilder(address=address)
    for tag, value in args:
        builder.add_arg(value, tag)
    return builder.build().dgram


def error_packet(text: str) -> bytes:
    if len(text) > MAX_ERROR_TEXT:
        text = text[:MAX_ERROR_TEXT - 3] + "..."
    return build_message(ERROR_ADDRESS, ("s", text))


def state_messages(session: str, state_message: dict, coefficient_max: float) -> list[bytes]:
    """The echo of a `state` message as OSC messages, in the order of docs/protocol.md."""
    base = f"/{PREFIX}/{session}"
    state = state_message.get("state") or {}
    out = [
        build_message(f"{base}/version", ("i", int(state_message.get("version", 0)))),
        build_message(f"{base}/step", ("i", int(state_message.get("step", 0)))),
        build_message(f"{base}/playback", ("s", str(state.get("playback", "")))),
        build_message(f"{base}/prompt", ("s", str(state.get("prompt", "")))),
        build_message(f"{base}/gate", ("f", float((state.get("gate") or {}).get("p", 0.0)))),
    ]
    for key, control in (state.get("directions") or {}).items():
        where = f"{base}/direction/{key_to_osc(key)}"
        coefficient = float(control.get("coefficient", 0.0))
        knob = min(max(coefficient / coefficient_max, 0.0), 1.0) if coefficient_max > 0 else 0.0
        out.append(build_message(f"{where}/coefficient", ("f", coefficient)))
        out.append(build_message(f"{where}/knob", ("f", knob)))
        out.append(build_message(f"{where}/active", ("i", 1 if control.get("active", True) else 0)))
    return out


def bundle_packets(messages: list[bytes], limit: int = MAX_REPLY_BYTES) -> list[bytes]:
    """Messages -> OSC bundles (time tag 'immediately'), split so that each stays under `limit` bytes
    where the messages allow (a direction's three messages are never split across bundles)."""
    packets: list[bytes] = []
    current: list[bytes] = []
    size = 16

    def flush() -> None:
        nonlocal current, size
        if current:
            builder = osc_bundle_builder.OscBundleBuilder(osc_bundle_builder.IMMEDIATELY)
            for m in current:
                builder.add_content(OscMessage(m))
            packets.append(builder.build().dgram)
        current, size = [], 16

    groups = [messages[:5]] + [messages[i:i + 3] for i in range(5, len(messages), 3)]
    for group in groups:
        group_size = sum(4 + len(m) for m in group)
        if current and size + group_size > limit:
            flush()
        current.extend(group)
        size += group_size
    flush()
    return packets


# --- the server -------------------------------------------------------------------------------------




class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, server: "OscServer"):
        self.server = server

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            self.server._received(data, addr)
        except Exception:  # never out of the transport's callback
            self.server._log.warning("OSC: error while receiving a datagram from %s", addr, exc_info=True)

    def error_received(self, exc: Exception) -> None:  # e.g. ICMP port unreachable after a reply
        log.debug("OSC socket error: %s", exc)


class _Subscription:
    __slots__ = ("session", "unsubscribe", "listeners")

    def __init__(self, session: Any, unsubscribe: Callable[[], None]):
        self.session = session
        self.unsubscribe = unsubscribe
        self.listeners: dict[Address, float] = {}  # sender -> time.monotonic() of its last message


class OscServer:
    """The OSC endpoint of a Hub (see the module docstring)."""

    def __init__(self, hub: Any, *, token: str | None = None, echo_seconds: float = 600,
                 max_datagram_bytes: int = MAX_DATAGRAM_BYTES):
        self.hub = hub
        self.token = token
        self.echo_seconds = float(echo_seconds)
        self.max_datagram_bytes = int(max_datagram_bytes)
        self.transport: asyncio.DatagramTransport | None = None
        self.address: Address | None = None
        self._authorised: set[Address] = set()
        self._pending: dict[Address, collections.deque] = {}
        self._workers: dict[Address, asyncio.Task] = {}
        self._subscriptions: dict[str, _Subscription] = {}
        self._log = RateLimitedLog(log, "OSC warnings")
        self._error_tokens = 2.0 * ERROR_REPLIES_PER_SECOND
        self._error_time = time.monotonic()
        self._rates: collections.OrderedDict[str, TokenBucket] = collections.OrderedDict()  # by IP address

    async def start(self, host: str = "127.0.0.1", port: int = 9000) -> Address:
        """Bind the UDP socket; returns the bound (host, port) (port 0 picks a free one)."""
        if self.transport is not None:
            raise RuntimeError("the OSC server is already started")
        if self.token is None and not is_loopback(host):
            raise ValueError(f"OSC on {host!r} (not loopback) needs a token: senders must send "
                             f"{AUTH_ADDRESS} s:TOKEN first")
        if self.token is not None and not self.token:
            raise ValueError("the OSC token must not be empty")
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: _Protocol(self), local_addr=(host, port))
        self.transport = transport
        sockname = transport.get_extra_info("sockname")
        self.address = (sockname[0], sockname[1])
        log.info("OSC listening on udp://%s:%d%s", self.address[0], self.address[1],
                 " (token required)" if self.token is not None else "")
        return self.address

    def close(self) -> None:
        for task in self._workers.values():
            task.cancel()
        self._workers.clear()
        self._pending.clear()
        for sub in self._subscriptions.values():
            try:
                sub.unsubscribe()
            except Exception:
                log.debug("OSC: unsubscribe failed", exc_info=True)
        self._subscriptions.clear()
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    # receiving -------------------------------------------------------------------------------------

    def _received(self, data: bytes, addr: Any) -> None:
        sender: Address = (addr[0], addr[1])
        if len(data) > self.max_datagram_bytes:
            self._refuse(sender, f"OSC datagram of {len(data)} bytes refused (at most {self.max_datagram_bytes})")
            return
        try:
            messages = parse_packet(data)
        except OscError as exc:  # (its reply is limited with every other error reply)
            self._refuse(sender, str(exc))
            return
        if not self._rate(sender[0]).take(len(messages)):
            self._refuse(sender, f"rate limit: at most {MESSAGES_PER_SECOND} OSC messages a second from one host "
                                 f"(bursts of {MESSAGE_BURST}); this datagram ({len(messages)} messages) was dropped")
            return
        for address, tags, params in messages:
            if address == AUTH_ADDRESS:
                self._auth(sender, tags, params)
                continue
            if self.token is not None and sender not in self._authorised:
                self._refuse(sender, f"{address}: not authorised; send {AUTH_ADDRESS} s:TOKEN first "
                                     "(from the same address and port)")
                continue
            try:
                action = translate(address, tags, params, directions=getattr(self.hub, "directions", ()),
                                   coefficient_max=float(self.hub.coefficient_max))
                self._listen(action.session, sender)
            except (OscError, ProtocolError) as exc:
                self._refuse(sender, str(exc))
                continue
            self._enqueue(sender, action)

    def _rate(self, host: str) -> TokenBucket:
        """The message bucket of a sending host, all its source ports together (a flood from many ports of one
        host is one flood); the least recently heard of MAX_RATE_SENDERS hosts are forgotten."""
        bucket = self._rates.get(host)
        if bucket is None:
            bucket = self._rates[host] = TokenBucket(MESSAGES_PER_SECOND, MESSAGE_BURST)
        else:
            self._rates.move_to_end(host)
        while len(self._rates) > MAX_RATE_SENDERS:
            self._rates.popitem(last=False)
        return bucket

    def _auth(self, sender: Address, tags: str, params: list) -> None:
        if self.token is None:
            return  # nothing to prove
        if tags != "s" or not hmac.compare_digest(params[0].encode(), self.token.encode()):
            self._authorised.discard(sender)
            self._refuse(sender, f"{AUTH_ADDRESS}: wrong token")
            return
        self._authorised.add(sender)
        log.info("OSC: %s:%d authorised", *sender)

    def _enqueue(self, sender: Address, action: Action) -> None:
        queue = self._pending.setdefault(sender, collections.deque())
        if len(queue) >= MAX_PENDING_PER_SENDER:
            self._refuse(sender, f"too many OSC messages waiting ({MAX_PENDING_PER_SENDER}); message dropped")
            return
        queue.append(action)
        if sender not in self._workers:
            self._workers[sender] = asyncio.get_running_loop().create_task(self._drain(sender))

    async def _drain(self, sender: Address) -> None:
        """Handle one sender's messages in arrival order; ends when its queue is empty."""
        queue = self._pending.get(sender)
        try:
            while queue:
                await self._run(sender, queue.popleft())
        finally:
            if self._workers.get(sender) is asyncio.current_task():
                del self._workers[sender]
                if not queue:
                    self._pending.pop(sender, None)

    async def _run(self, sender: Address, action: Action) -> None:
        try:
            session = self.hub.get_session(action.session)
            if action.sync:
                self._send_state(session.state_message(), action.session, [sender])
                return
            message = action.message
            if action.new_at_zero is not None:
                directions = (session.state_message().get("state") or {}).get("directions") or {}
                if action.new_at_zero not in directions:
                    message["directions"][action.new_at_zero]["coefficient"] = 0.0
            await session.handle(message, Cause(via="osc", client_id=f"{sender[0]}:{sender[1]}"))
        except asyncio.CancelledError:
            raise
        except (OscError, ProtocolError) as exc:
            self._refuse(sender, str(exc))
        except Exception as exc:
            self._log.warning("OSC: handling %r from %s:%d failed", action, *sender, exc_info=True)
            self._reply(sender, error_packet(f"internal error: {type(exc).__name__}: {exc}"))

    def _refuse(self, sender: Address, text: str) -> None:
        self._log.warning("OSC from %s:%d: %s", sender[0], sender[1], text)
        now = time.monotonic()
        self._error_tokens = min(2.0 * ERROR_REPLIES_PER_SECOND,
                                 self._error_tokens + (now - self._error_time) * ERROR_REPLIES_PER_SECOND)
        self._error_time = now
        if self._error_tokens >= 1.0:
            self._error_tokens -= 1.0
            self._reply(sender, error_packet(text))

    def _reply(self, sender: Address, packet: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        try:
            self.transport.sendto(packet, sender)
        except Exception as exc:  # OSError: unreachable, too large, ...
            self._log.warning("OSC: cannot send %d bytes to %s:%d: %s", len(packet), sender[0], sender[1], exc)

    # echo ------------------------------------------------------------------------------------------

    def _listen(self, name: str, sender: Address) -> None:
        """Remember that `sender` talks to session `name` (subscribing to it on first use)."""
        session = self.hub.get_session(name)  # ProtocolError: too many sessions, ...
        sub = self._subscriptions.get(name)
        if sub is None or sub.session is not session:  # new, or the hub replaced the session
            if sub is not None:
                try:
                    sub.unsubscribe()
                except Exception:
                    log.debug("OSC: unsubscribe failed", exc_info=True)
            # Forget the sessions the hub closed (reaped when idle), so that they can be freed.
            for other in [n for n, s in self._subscriptions.items() if getattr(s.session, "closed", False)]:
                del self._subscriptions[other]
            unsubscribe = session.subscribe(lambda message, name=name: self._on_session_message(name, message))
            listeners = sub.listeners if sub is not None else {}
            sub = self._subscriptions[name] = _Subscription(session, unsubscribe)
            sub.listeners = listeners
        now = time.monotonic()
        sub.listeners.pop(sender, None)  # re-inserted last: the dict is ordered by last message
        sub.listeners[sender] = now
        if len(sub.listeners) > MAX_LISTENERS:
            for old in [a for a, seen in sub.listeners.items() if now - seen > self.echo_seconds]:
                del sub.listeners[old]
            while len(sub.listeners) > MAX_LISTENERS:
                del sub.listeners[next(iter(sub.listeners))]

    def _on_session_message(self, name: str, message: dict) -> None:
        try:
            if not isinstance(message, dict) or message.get("type") != "state":
                return
            sub = self._subscriptions.get(name)
            if sub is None:
                return
            now = time.monotonic()
            for sender, seen in list(sub.listeners.items()):
                if now - seen > self.echo_seconds:
                    del sub.listeners[sender]
            if sub.listeners:
                self._send_state(message, name, list(sub.listeners))
        except Exception:
            self._log.warning("OSC: echo of session %r failed", name, exc_info=True)

    def _send_state(self, message: dict, name: str, senders: list[Address]) -> None:
        packets = bundle_packets(state_messages(name, message, float(self.hub.coefficient_max)))
        for sender in senders:
            for packet in packets:
                self._reply(sender, packet)
