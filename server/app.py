"""`musicrfm serve`: the model, the sessions, and the transports (WebSocket + HTTP page, OSC).

One port serves the browser page (plain HTTP GET) and the WebSocket endpoint `/ws`; OSC listens on a UDP
port. Every client speaks docs/protocol.md. Bad input is answered and dropped; it never reaches the stream
and never stops anybody else's audio.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import itertools
import json
import logging
import mimetypes
import os
import re
import secrets
import signal
import socket
import stat
from collections.abc import Awaitable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from importlib.resources import files
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from musicrfm.engine.bank import DirectionBank
from musicrfm.engine.loop import Engine
from musicrfm.engine.model import NOISE_WARNING, MusicModel, bundled_prompts
from musicrfm.engine.steering import steerable_keys

from musicrfm.protocol import fields
from musicrfm.protocol.wire import (MAX_MESSAGE_BYTES, MAX_NESTING, PROTOCOL_VERSION, AUDIO_HEADER_BYTES, ProtocolError,
                       decode_message, encode_message, is_loopback, valid_session_name)
from .limits import TokenBucket
from .scheduler import DeviceScheduler
from .session import RECORD_START_BURST, RECORD_START_SECONDS, Cause, Session, SessionConfig
from .state import (MAX_DIRECTION_KEY_CHARS, MAX_DIRECTIONS, MAX_PROMPT_CHARS, MAX_SCHEDULE_POINTS, MAX_STATE_BYTES,
                    ControlState)
from .stream import (MAX_FUTURE_CHANGES, MAX_OUT_OF_ORDER_CHANGES, PROMPT_ENCODE_SHARE, PROMPT_MIN_SECONDS,
                     Stream)

log = logging.getLogger("musicrfm.server")
SEND_BUFFER_BYTES = 128 * 1024  # a connection's kernel send buffer (about 1 s of audio; Linux doubles it)
# What one client may cost the server, whatever it sends or fails to read (docs/protocol.md states each):
CONTROL_QUEUE_BYTES = 1024 * 1024  # control messages waiting to go out to one client, beyond its audio allowance
SEND_TIMEOUT_SECONDS = 10.0  # a client that takes none of what it is sent for this long has stopped reading
CLOSE_GRACE_SECONDS = 5.0  # a close frame that cannot get out to a stuck client in this time: the socket is cut
MAX_ERROR_CHARS = 500  # an error's text (each piece of the client's input in it is cut to fields.ECHO_CHARS)
RATE_NOTICE_SECONDS = 5.0  # at most one rate-limit error per this many seconds: the others are dropped silently
RATE_ABUSE_MESSAGES = 2000  # messages refused beyond the rate itself (i.e. sent at over twice the rate) before a close
ID_MIN, ID_MAX = -(2 ** 63), 2 ** 63 - 1  # an integer `id` (echoed to msgpack clients, whose ints are 64-bit)
ID_MAX_CHARS = 64
# The browser page is a client (it speaks only the public protocol); the server just hands out its files.
WEB_ROOT = Path(str(files("musicrfm.clients") / "web"))
LOOPBACK_NAMES = ("localhost",)
# GET /recordings/NAME: a file directly inside --record-dir, named as the server names recordings
# (SESSION-EPOCH-TIME.wav / .jsonl: letters, digits, '-', '_'). No '/', '.' or '%' fits, so a name can never
# leave the folder or name a hidden file, and it never reaches the file system unless it fits.
RECORDING_NAME = re.compile(r"[A-Za-z0-9_-]{1,200}\.(wav|jsonl)")
RECORDING_TYPES = {"wav": "audio/wav", "jsonl": "application/x-ndjson"}
# The HTTP side of websockets sends a body from memory: downloads in flight hold at most this much in all
# (an hour of 32 kHz mono is 230 MB), and a larger file is not served (it stays on the server's disk).
DOWNLOAD_MAX_BYTES = 256 * 1024 * 1024


# The page's and a control surface's full knob, in relative strength units (engine.steering): on musicgen-mini
# it reaches >= 0.8 pitch-class accuracy, and half of it an audible but musical pull (docs/musicgen-mini.md).
RELATIVE_KNOB_MAX = 1.0


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    osc_host: str = "127.0.0.1"
    osc_port: int | None = 9000  # None: no OSC
    token: str | None = None
    max_sessions: int = 8  # `main` always has a place: other sessions may take max_sessions - 1
    idle_seconds: float = 300.0  # a session nobody listens to or sends anything for this long is closed
    messages_per_second: float = 100.0
    message_burst: int = 200
    send_queue_seconds: float = 2.0  # audio a slow client may have queued before it is dropped
    coefficient_max: float = RELATIVE_KNOB_MAX  # the knob range: OSC /knob 0..1 and the page's knobs
    context_steps: int | None = None
    keep_steps: int | None = None
    # Browsers: pages from these origins (scheme://host[:port]) may connect, besides same-origin and loopback.
    allow_origins: tuple[str, ...] = ()
    # Host names (besides IP addresses, localhost and --host) the server answers to: DNS rebinding guard.
    allow_hosts: tuple[str, ...] = ()
    session: SessionConfig = field(default_factory=SessionConfig)
    initial: ControlState = field(default_factory=ControlState)
    lanes: int | None = None  # None: default_lanes (one on a GPU, one per core on a CPU)
    capture: bool = False  # replay the batched step captured (engine.graphs); `musicrfm serve`: server.cli.captures


def default_lanes(device: str) -> int:
    """Lanes of sessions (server/scheduler.py): one on a GPU; on a CPU one per core, at most 8."""
    return 1 if device != "cpu" else max(1, min(os.cpu_count() or 1, 8))


class Hub:
    """The server's sessions, sharing one model and one merged bank."""

    def __init__(self, model: MusicModel, bank: DirectionBank | None, bank_paths: list[Path], config: ServerConfig):
        self.model, self.bank, self.bank_paths, self.config = model, bank, bank_paths, config
        self.sessions: dict[str, Session] = {}
        self.directions: list[str] = sorted(steerable_keys(bank))
        self.example_prompts: list[str] = list(bundled_prompts(model.name))  # read once, sent in every hello
        self.coefficient_max = config.coefficient_max
        # The device's lanes (one on a GPU, one per core on a CPU), each an engine and a thread: a lane's sessions
        # that need audio at the same time step together in one batched forward (server/scheduler.py).
        lanes = config.lanes or default_lanes(model.device.type)
        self.engines = [Engine(model, context_steps=config.context_steps,
                               slots=max(1, min(config.max_sessions, 8) // lanes),
                               capture=config.capture,
                               site=bank.injection_point if bank is not None else "residual")
                        for _ in range(lanes)]
        self.scheduler = DeviceScheduler(model.frame_rate, self.engines)
        self._client_ids = itertools.count(1)
        self._reaper: asyncio.Task | None = None

    def next_client_id(self) -> int:
        return next(self._client_ids)

    def start(self) -> None:
        """Start reaping idle sessions (on the running loop)."""
        self._reaper = asyncio.get_running_loop().create_task(self._reap_forever(), name="session reaper")

    async def _reap_forever(self) -> None:
        every = min(max(self.config.idle_seconds / 4, 0.05), 5.0)
        while True:
            await asyncio.sleep(every)
            try:
                await self.reap_idle()
            except Exception:  # never let one failure stop the reaping
                log.exception("reaping idle sessions failed")

    async def reap_idle(self) -> list[str]:
        """Close the sessions nobody has listened to or sent anything for `idle_seconds` (a recording in
        progress is finalised); their names are free again. Returns the names closed."""
        idle = [name for name, s in self.sessions.items() if s.idle_for() >= self.config.idle_seconds]
        closing = [self.sessions.pop(name) for name in idle]
        for session in closing:
            log.info("session %s closed: nobody used it for %g s (--idle-seconds)", session.name,
                     self.config.idle_seconds)
        await asyncio.gather(*(s.close() for s in closing))
        return idle

    def get_session(self, name: str) -> Session:
        if not valid_session_name(name):
            raise ProtocolError(f"bad session name {fields.shown(name)}: 1-64 letters, digits, '-' or '_'")
        session = self.sessions.get(name)
        if session is not None:
            session.touch()  # a message for it (OSC, or a client joining): it is in use
        else:
            # `main` always has a place: the other sessions may fill all but one.
            others = sum(1 for n in self.sessions if n != "main")
            if name != "main" and others >= self.config.max_sessions - 1:
                raise ProtocolError(f"the server holds its maximum of {self.config.max_sessions} sessions (one "
                                    f"of them kept for 'main'); a session nobody uses closes after "
                                    f"{self.config.idle_seconds:g} s")
            stream = Stream(self.model, self.bank, self.config.initial, context_steps=self.config.context_steps,
                            keep_steps=self.config.keep_steps, engine=self.scheduler.engine_for_new_stream())
            session = Session(name, stream, self.config.session, self.bank_paths, self.scheduler)
            session.start()
            self.sessions[name] = session
            log.info("session %s created", name)
        return session

    def hello(self, session: Session, client_id: int) -> dict:
        m = self.model
        state = session.state_message()
        return {"type": "hello", "protocol": PROTOCOL_VERSION, "session": session.name, "client_id": client_id,
                "sample_rate": m.sample_rate, "channels": 1, "frame_rate": m.frame_rate, "hop": int(m.hop_length),
                "codebooks": m.num_codebooks, "audio": {"format": "f32le", "header_bytes": AUDIO_HEADER_BYTES},
                "model": m.name, "random_weights": m.is_random, "note": NOISE_WARNING if m.is_random else "",
                "directions": self.directions, "example_prompts": self.example_prompts,
                "limits": self.limits(),
                # What a coefficient means: the units new sessions start in, and (relative units) each layer's
                # typical activation norm, so a client can show a strength in hidden-state units too.
                "strength": {"units": self.config.initial.steering.units,
                             "coefficient_max": self.config.coefficient_max,
                             "layer_norms": list(self.bank.layer_norms.mean)
                             if self.bank is not None and self.bank.layer_norms is not None else None},
                "version": state["version"], "epoch": state["epoch"], "step": state["step"], "state": state["state"],
                "recording": state["recording"]}

    def limits(self) -> dict:
        """The bounds a client may meet, as `hello` lists them (docs/protocol.md, "Server messages")."""
        c, s = self.config, self.config.session
        return {"max_message_bytes": MAX_MESSAGE_BYTES, "messages_per_second": c.messages_per_second,
                "message_burst": c.message_burst, "coefficient_max": c.coefficient_max,
                "max_sessions": c.max_sessions, "idle_seconds": c.idle_seconds,
                "max_id_chars": ID_MAX_CHARS, "max_nesting": MAX_NESTING, "max_prompt_chars": MAX_PROMPT_CHARS,
                "max_directions": MAX_DIRECTIONS, "max_direction_key_chars": MAX_DIRECTION_KEY_CHARS,
                "max_schedule_points": MAX_SCHEDULE_POINTS, "max_state_bytes": MAX_STATE_BYTES,
                "max_future_changes": MAX_FUTURE_CHANGES, "max_out_of_order_changes": MAX_OUT_OF_ORDER_CHANGES,
                "prompt_min_seconds": PROMPT_MIN_SECONDS, "prompt_encode_share": PROMPT_ENCODE_SHARE,
                "record_start_burst": RECORD_START_BURST, "record_start_seconds": RECORD_START_SECONDS,
                "record_max_seconds": s.record_max_seconds, "record_max_mb": s.record_max_mb,
                "record_min_free_mb": s.record_min_free_mb}

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        await asyncio.gather(*(s.close() for s in self.sessions.values()))
        self.scheduler.close()


def _valid_id(value) -> bool:
    """An `id` the server can echo to every client: a string of valid Unicode or a 64-bit integer."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return ID_MIN <= value <= ID_MAX
    if not isinstance(value, str) or len(value) > ID_MAX_CHARS:
        return False
    try:  # a lone surrogate (a JSON "\ud800" escape) cannot be sent to the msgpack clients the id is echoed to
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _error(message_id, text: str) -> dict:
    """An `error` message whose text any client can take: bounded, and valid Unicode (a client's input quoted
    in it may hold a lone surrogate, which msgpack cannot encode)."""
    if len(text) > MAX_ERROR_CHARS:
        text = text[:MAX_ERROR_CHARS] + "..."
    return {"type": "error", "id": message_id,
            "message": text.encode("utf-8", "backslashreplace").decode("utf-8")}


def _close_reason(text: str) -> str:
    """A close frame's reason: at most 123 bytes of UTF-8 (the frame's limit), whatever the text holds."""
    data = text.encode("utf-8", "backslashreplace")
    return data[:120].decode("utf-8", "ignore") if len(data) > 123 else data.decode("utf-8")


class WebSocketClient:
    """One connection: a send queue drained by its own task, so a slow client never holds up the session.

    The queue is bounded in bytes: `max_queued_samples` of audio (`send_queue_seconds`), and
    CONTROL_QUEUE_BYTES on top for everything. A client over either bound, or that takes nothing for
    SEND_TIMEOUT_SECONDS (it stopped reading: even with no audio, the replies to its own messages and the
    pings pile up), is dropped: closed, and cut if the close cannot get out. Nothing here raises into the
    session: a message that cannot be encoded for this client drops this client."""

    def __init__(self, ws: ServerConnection, client_id: int, encoding: str, max_queued_samples: int):
        self.ws, self.client_id, self.encoding = ws, client_id, encoding
        self.max_queued_samples = max_queued_samples
        self.max_queued_bytes = max_queued_samples * 4 + CONTROL_QUEUE_BYTES  # f32 samples, then the rest
        self._queue: asyncio.Queue[tuple[bytes | str, int, int]] = asyncio.Queue()
        self._queued_samples = 0
        self._queued_bytes = 0
        self._dropped = False
        self._closer: asyncio.Task | None = None
        sock = ws.transport.get_extra_info("socket")
        if sock is not None:
            # Left to the kernel, a connection's send buffer grows to megabytes (~25 s of audio): a client that
            # stops reading would fill it before the queue above, and be closed that much later.
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
            except OSError:
                pass
        self.sender = asyncio.get_running_loop().create_task(self._send_forever())

    def send_message(self, message: dict) -> None:
        if self._dropped:
            return
        try:
            frame = encode_message(message, self.encoding)
        except Exception as exc:  # e.g. an integer msgpack cannot carry: this client's problem, nobody else's
            log.error("client %s: a %s message could not be encoded (%s): closing it", self.client_id,
                      message.get("type"), exc)
            self.drop(f"internal error: a message could not be encoded ({type(exc).__name__})")
            return
        self._put(frame, 0)

    def send_error(self, message_id, text: str) -> None:
        self.send_message(_error(message_id, text))

    def send_audio(self, frame: bytes, samples: int) -> None:
        if self._queued_samples + samples > self.max_queued_samples:
            self.drop("the audio backlog overflowed", code=1013)
            return
        self._queued_samples += samples
        self._put(frame, samples)

    def _put(self, item: bytes | str, samples: int) -> None:
        if self._dropped:
            return
        size = len(item)  # JSON text is ASCII (escapes for the rest): characters are bytes
        if self._queued_bytes + size > self.max_queued_bytes:
            self.drop("its send queue overflowed", code=1013)
            return
        self._queued_bytes += size
        self._queue.put_nowait((item, samples, size))

    def drop(self, reason: str, code: int = 1011) -> None:
        """Stop sending and close the connection with `code` (1013: too slow; 1008: abuse; 1011, the
        session's default: something went wrong sending to it). Never raises: the session calls this."""
        if self._dropped:
            return
        self._dropped = True
        if code == 1013:
            log.warning("client %s is too slow (%s): closing it", self.client_id, reason)
            reason = f"too slow: {reason}"
        self._queue = asyncio.Queue()  # what was waiting is freed now, not when the client goes
        self._queued_bytes = self._queued_samples = 0
        self.sender.cancel()
        self._closer = asyncio.get_running_loop().create_task(self._close(code, _close_reason(reason)))

    async def closed(self) -> None:
        """Once a dropped client's close is done (at once if it was not dropped)."""
        if self._closer is not None:
            await asyncio.shield(self._closer)

    async def _close(self, code: int, reason: str) -> None:
        """A close frame if it can get out; if the client reads nothing, the socket is cut after a grace."""
        try:
            await asyncio.wait_for(self.ws.close(code, reason), CLOSE_GRACE_SECONDS)
        except (asyncio.TimeoutError, ConnectionClosed, OSError):
            pass
        self.ws.transport.abort()  # no-op when the close went through and the connection is gone

    async def _send_forever(self) -> None:
        try:
            while True:
                item, samples, size = await self._queue.get()
                try:
                    await asyncio.wait_for(self.ws.send(item), SEND_TIMEOUT_SECONDS)
                except asyncio.TimeoutError:
                    self.drop(f"not reading: nothing taken for {SEND_TIMEOUT_SECONDS:g} s", code=1013)
                    return
                self._queued_samples -= samples
                self._queued_bytes -= size
        except ConnectionClosed:
            pass


@dataclass
class MessageLimit:
    """A connection's message rate (TokenBucket): `rate` a second, bursts of `burst`. What the bucket refuses
    is dropped; the client hears about it once per RATE_NOTICE_SECONDS (with a count), not once a message,
    and a client that keeps far over the rate (RATE_ABUSE_MESSAGES refused beyond the rate itself) is closed."""

    rate: float
    burst: int
    refused: int = 0  # since the last notice
    messages: TokenBucket = field(init=False)
    notices: TokenBucket = field(init=False)
    abuse: TokenBucket = field(init=False)

    def __post_init__(self) -> None:
        self.messages = TokenBucket(self.rate, self.burst)
        self.notices = TokenBucket(1 / RATE_NOTICE_SECONDS, 1)
        self.abuse = TokenBucket(self.rate, RATE_ABUSE_MESSAGES)

    def take(self) -> str:
        """'ok' (handle the message), 'notice' (drop it and say so), 'drop' (drop it silently) or 'close'."""
        if self.messages.take():
            return "ok"
        self.refused += 1
        if not self.abuse.take():
            return "close"
        return "notice" if self.notices.take() else "drop"

    def notice(self) -> str:
        refused, self.refused = self.refused, 0
        return (f"rate limit: at most {self.rate:g} messages a second (bursts of {self.burst}); {refused} "
                f"dropped, and further ones are dropped without a reply for {RATE_NOTICE_SECONDS:g} s")


def _host_name(netloc: str) -> str | None:
    """The host of a Host header or an origin's netloc ('[::1]:8765' -> '::1'), lowercased; None if garbled."""
    netloc = netloc.strip().lower()
    if netloc.startswith("["):
        end = netloc.find("]")
        return netloc[1:end] if end > 1 else None
    name = netloc.rsplit(":", 1)[0] if netloc.count(":") == 1 else netloc
    return name.rstrip(".") or None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _origin(text: str, strict: bool = True) -> str | None:
    """'scheme://host[:port]', lowercased, as browsers send it in Origin. `strict` (--allow-origin): a bad
    one is an error; else None."""
    url = urlsplit(text.strip().lower().rstrip("/"))
    if url.scheme in ("http", "https") and url.netloc and not url.path and not url.query and "@" not in url.netloc:
        return f"{url.scheme}://{url.netloc}"
    if strict:
        raise ValueError(f"--allow-origin {text!r}: give an origin, scheme://host[:port] (e.g. https://example.org)")
    return None


class Server:
    """Owns the hub and both transports; `run()` serves until `stop()` (or SIGINT / SIGTERM)."""

    def __init__(self, model: MusicModel, bank: DirectionBank | None, bank_paths: list[Path], config: ServerConfig):
        if not is_loopback(config.host) and not config.token:
            raise ValueError(f"binding {config.host} (not loopback) needs a token: pass --token (clients add "
                             f"?token=... to their URL)")
        if config.lanes is not None and not 1 <= config.lanes <= 64:
            raise ValueError(f"lanes must be in 1..64, got {config.lanes}")
        if config.max_sessions < 1 or not config.idle_seconds > 0:
            raise ValueError(f"max_sessions must be >= 1 and idle_seconds > 0, got {config.max_sessions} and "
                             f"{config.idle_seconds}")
        if config.osc_port is not None and not is_loopback(config.osc_host) and not config.token:
            raise ValueError(f"binding OSC to {config.osc_host} (not loopback) needs a token: pass --token")
        self.config = config
        self.allowed_origins = frozenset(_origin(o) for o in config.allow_origins)
        names = (*config.allow_hosts, config.host, *LOOPBACK_NAMES)
        self.allowed_hosts = frozenset(h.lower().rstrip(".") for h in names)
        # The page's files, listed once: a request names one of these or gets a 404 (its path never reaches the
        # file system, however long or odd it is).
        self.web_files = {p.name: p for p in WEB_ROOT.iterdir() if p.is_file() and not p.name.startswith(".")}
        self.hub = Hub(model, bank, bank_paths, config)
        self._downloading = 0  # bytes of recordings being sent (DOWNLOAD_MAX_BYTES in all)
        self._download_tasks: set[asyncio.Task] = set()
        self._stop = asyncio.Event()
        self.ws_address: tuple[str, int] | None = None
        self.osc_address: tuple[str, int] | None = None
        self._osc = None

    def stop(self) -> None:
        self._stop.set()

    # --- HTTP -----------------------------------------------------------------------------------------

    @property
    def _cookie_name(self) -> str:  # one per port: two servers on one host keep their own tokens
        return f"musicrfm_token_{self.ws_address[1] if self.ws_address else self.config.port}"

    def _token_ok(self, request: Request, query: dict[str, list[str]], cookie: bool = False) -> bool:
        """The token from ?token=, or (`cookie`: the page's own files) from the cookie the page was given."""
        if not self.config.token:
            return True
        expected = self.config.token.encode()
        given = query.get("token", [""])[0]
        if hmac.compare_digest(given.encode(), expected):
            return True
        if cookie:
            try:
                jar = SimpleCookie(request.headers.get("Cookie", ""))
            except CookieError:
                return False
            morsel = jar.get(self._cookie_name)
            return morsel is not None and hmac.compare_digest(unquote(morsel.value).encode(), expected)
        return False

    def _host_ok(self, request: Request) -> bool:
        """DNS rebinding guard: a browser on evil.example, whose name now resolves to this machine, still
        sends `Host: evil.example`. IP addresses cannot be rebound; names must be loopback names, --host or
        --allow-host. No Host header: not a browser."""
        host = request.headers.get("Host")
        if host is None:
            return True
        name = _host_name(host)
        if name is None:
            return False
        return _is_ip(name) or name in self.allowed_hosts

    def _origin_ok(self, request: Request) -> bool:
        """A browser says which page a request comes from: only this server's own page, loopback pages and
        --allow-origin ones may use it. No Origin header: not a browser (curl, Python, OSC bridges)."""
        origin = request.headers.get("Origin")
        if origin is None:
            return True
        normal = _origin(origin, strict=False)
        if normal is None:
            return False  # "null" (a sandboxed or file:// page) or garbage
        if normal in self.allowed_origins:
            return True
        name = _host_name(urlsplit(normal).netloc)
        if name is not None and is_loopback(name):
            return True
        host = request.headers.get("Host")
        return host is not None and urlsplit(normal).netloc == host.lower()  # same-origin

    def _process_request(self, connection: ServerConnection,
                         request: Request) -> Response | Awaitable[Response] | None:
        if not self._host_ok(request):
            return connection.respond(HTTPStatus.FORBIDDEN, "unknown Host: start the server with --allow-host NAME "
                                                            "to use it under that name\n")
        if not self._origin_ok(request):
            return connection.respond(HTTPStatus.FORBIDDEN, "a page from another origin may not use this server: "
                                                            "start it with --allow-origin ORIGIN to allow one\n")
        url = urlsplit(request.path)
        query = parse_qs(url.query)
        refused = "a token is required: add ?token=... to the URL\n"
        if url.path == "/ws":
            if not self._token_ok(request, query):
                return connection.respond(HTTPStatus.FORBIDDEN, refused)
            return None  # the WebSocket handshake goes on
        if not self._token_ok(request, query, cookie=True):
            return connection.respond(HTTPStatus.FORBIDDEN, refused)
        if url.path == "/health":
            body = json.dumps({"ok": True, "sessions": sorted(self.hub.sessions),
                               "device": self.hub.scheduler.to_dict()}).encode()
            return Response(200, "OK", Headers([("Content-Type", "application/json"),
                                                ("Content-Length", str(len(body)))]), body)
        if url.path.startswith("/recordings/"):
            return self._recording(connection, url.path[len("/recordings/"):])
        name = "index.html" if url.path in ("/", "") else url.path[1:]
        path = self.web_files.get(name)  # a flat folder: no "..", no subfolders, nothing outside clients/web
        if path is None:
            return connection.respond(HTTPStatus.NOT_FOUND, f"not found: {url.path[:100]}\n")
        body = path.read_bytes()
        kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if name.endswith(".js"):
            kind = "text/javascript"
        headers = Headers([("Content-Type", kind + ("; charset=utf-8" if kind.startswith("text") else "")),
                           ("Content-Length", str(len(body))), ("Cache-Control", "no-store")])
        if self.config.token and name == "index.html":
            # The page's own files (app.js, worklet.js, style.css) are fetched by the browser without the
            # page's ?token=: it hands them this cookie (same-site only, never readable by scripts).
            headers["Set-Cookie"] = (f"{self._cookie_name}={quote(self.config.token, safe='')}; Path=/; HttpOnly; "
                                     f"SameSite=Strict")
        return Response(200, "OK", headers, body)

    def _recording(self, connection: ServerConnection, name: str) -> Response | Awaitable[Response]:
        """GET /recordings/NAME (docs/protocol.md): a recording's WAV or log from --record-dir, as an attachment.
        Only regular files directly in that folder (no symlinks), within DOWNLOAD_MAX_BYTES in flight."""
        match = RECORDING_NAME.fullmatch(name)
        if match is None:
            return connection.respond(HTTPStatus.NOT_FOUND, "not found: a recording's name is NAME.wav or NAME.jsonl "
                                                            "(letters, digits, '-' and '_')\n")
        path = self.config.session.record_dir / name
        try:
            info = path.lstat()
        except OSError:
            info = None
        if info is None or not stat.S_ISREG(info.st_mode):
            return connection.respond(HTTPStatus.NOT_FOUND, f"no recording {name}\n")
        size = info.st_size
        if size > DOWNLOAD_MAX_BYTES:
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE,
                                      f"{name} is {size / 1e6:.0f} MB, over the {DOWNLOAD_MAX_BYTES // 2 ** 20} MiB "
                                      f"served over HTTP: copy it from the server's --record-dir\n")
        if self._downloading + size > DOWNLOAD_MAX_BYTES:
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "other downloads are under way: try again "
                                                                      "in a moment\n")
        # Held until the connection is gone (its body sent or abandoned): what it holds in memory until then.
        self._downloading += size
        waiter = asyncio.get_running_loop().create_task(connection.wait_closed())
        self._download_tasks.add(waiter)

        def release(task: asyncio.Task) -> None:
            self._downloading -= size
            self._download_tasks.discard(task)

        waiter.add_done_callback(release)
        return self._recording_response(connection, path, size, RECORDING_TYPES[match.group(1)])

    async def _recording_response(self, connection: ServerConnection, path: Path, size: int,
                                  kind: str) -> Response:
        try:  # in a thread: a large file must not hold up the sessions' audio on the event loop
            body = await asyncio.to_thread(_read_regular_file, path, size)
        except OSError:
            body = None
        if body is None:
            return connection.respond(HTTPStatus.NOT_FOUND, f"no recording {path.name}\n")
        headers = Headers([("Content-Type", kind), ("Content-Length", str(len(body))), ("Cache-Control", "no-store"),
                           ("Content-Disposition", f'attachment; filename="{path.name}"'),
                           ("X-Content-Type-Options", "nosniff")])
        return Response(200, "OK", headers, body)

    # --- WebSocket ------------------------------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        query = parse_qs(urlsplit(ws.request.path).query)
        name = query.get("session", ["main"])[0]
        encoding = query.get("encoding", ["json"])[0]
        if encoding not in ("json", "msgpack"):
            await ws.close(1008, "encoding must be json or msgpack")
            return
        try:
            session = self.hub.get_session(name)
        except ProtocolError as exc:
            await ws.close(1008, _close_reason(str(exc)))
            return
        client_id = self.hub.next_client_id()
        rate = session.sample_rate
        client = WebSocketClient(ws, client_id, encoding, int(self.config.send_queue_seconds * rate))
        client.send_message(self.hub.hello(session, client_id))
        session.add_listener(client)
        limit = MessageLimit(self.config.messages_per_second, self.config.message_burst)
        log.info("client %s joined session %s", client_id, name)
        try:
            async for frame in ws:
                verdict = limit.take()
                if verdict != "ok":
                    if verdict == "notice":
                        client.send_error(None, limit.notice())
                    elif verdict == "close":
                        log.warning("client %s keeps sending far over the rate limit: closing it", client_id)
                        client.drop("far over the rate limit, for too long", code=1008)
                        await client.closed()  # returning first would close with 1000
                        break
                    continue
                message_id = None
                try:
                    message = decode_message(frame)
                    message_id = message.get("id")
                    if message_id is not None and not _valid_id(message_id):
                        message_id = None
                        raise ProtocolError(f"id must be a string of valid Unicode of at most {ID_MAX_CHARS} "
                                            f"characters, or an integer in [-2**63, 2**63 - 1]")
                    await session.handle(message, Cause("websocket", client_id, message_id))
                    if message["type"] == "get":
                        client.send_message({**session.state_message(), "id": message_id})
                except ProtocolError as exc:
                    if message_id is None and _valid_id(exc.message_id):  # e.g. a NaN in a message with an id
                        message_id = exc.message_id
                    client.send_error(message_id, str(exc))
        except ConnectionClosed:
            pass
        finally:
            session.remove_listener(client)
            client.sender.cancel()
            log.info("client %s left session %s", client_id, name)

    # --- running --------------------------------------------------------------------------------------

    async def start(self) -> None:
        c = self.config
        self.hub.start()
        self._ws = await serve(self._handle, c.host, c.port, process_request=self._process_request,
                               max_size=MAX_MESSAGE_BYTES, compression=None, ping_interval=20, ping_timeout=20,
                               close_timeout=5, server_header="musicrfm")
        sock = next(iter(self._ws.sockets))
        self.ws_address = sock.getsockname()[:2]
        if c.osc_port is not None:
            from .osc import OscServer

            self._osc = OscServer(self.hub, token=c.token)
            self.osc_address = await self._osc.start(c.osc_host, c.osc_port)

    async def close(self) -> None:
        """Clean shutdown: finalise recordings, tell clients the server is going away (1001)."""
        if self._osc is not None:
            self._osc.close()
        await self.hub.close()
        self._ws.close(close_connections=True)
        await self._ws.wait_closed()

    async def run(self, ready=None) -> None:
        await self.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, self.stop)
            except (NotImplementedError, RuntimeError):  # not the main thread, or not a Unix loop
                pass
        if ready is not None:
            ready(self)
        try:
            await self._stop.wait()
        finally:
            await self.close()


def _read_regular_file(path: Path, limit: int) -> bytes | None:
    """At most `limit` bytes of `path` if it is a regular file (not a symlink, a FIFO or a folder, even one put
    there since it was looked at); None otherwise."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            return None
        return fh.read(limit)


def new_token() -> str:
    return secrets.token_urlsafe(18)
