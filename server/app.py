"""`musicrfm serve`: the model, the sessions, and the transports (WebSocket + HTTP page, OSC).

One port serves the browser page (plain HTTP GET) and the WebSocket endpoint `/ws`; OSC listens on a UDP
port. Every client speaks docs/protocol.md. Bad input is answered and dropped; it never reaches the stream
and never stops anybody else's audio.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import logging
import mimetypes
import secrets
import signal
import socket
from dataclasses import dataclass, field
from http import HTTPStatus
from importlib.resources import files
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from musicrfm.engine.bank import DirectionBank
from musicrfm.engine.model import NOISE_WARNING, MusicModel

from musicrfm.protocol.wire import (MAX_MESSAGE_BYTES, PROTOCOL_VERSION, AUDIO_HEADER_BYTES, ProtocolError, decode_message,
                       encode_message, is_loopback, valid_session_name)
from .limits import TokenBucket
from .session import Cause, Session, SessionConfig
from .state import ControlState
from .stream import Stream

log = logging.getLogger("musicrfm.server")
SEND_BUFFER_BYTES = 128 * 1024  # a connection's kernel send buffer (about 1 s of audio; Linux doubles it)
# The browser page is a client (it speaks only the public protocol); the server just hands out its files.
WEB_ROOT = Path(str(files("musicrfm.clients") / "web"))


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
    coefficient_max: float = 2.0  # the knob range: OSC /knob 0..1 and the page's knobs
    context_steps: int | None = None
    keep_steps: int | None = None
    session: SessionConfig = field(default_factory=SessionConfig)
    initial: ControlState = field(default_factory=ControlState)




class Hub:
    """The server's sessions, sharing one model and one merged bank."""

    def __init__(self, model: MusicModel, bank: DirectionBank | None, bank_paths: list[Path], config: ServerConfig):
        self.model, self.bank, self.bank_paths, self.config = model, bank, bank_paths, config
        self.sessions: dict[str, Session] = {}
        self.directions: list[str] = sorted(bank.keys()) if bank is not None else []
        self.coefficient_max = config.coefficient_max
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
            raise ProtocolError(f"bad session name {name!r}: 1-64 letters, digits, '-' or '_'")
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
                            keep_steps=self.config.keep_steps)
            session = Session(name, stream, self.config.session, self.bank_paths)
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
                "directions": self.directions,
                "limits": {"max_message_bytes": MAX_MESSAGE_BYTES,
                           "messages_per_second": self.config.messages_per_second,
                           "coefficient_max": self.config.coefficient_max},
                "version": state["version"], "epoch": state["epoch"], "step": state["step"], "state": state["state"],
                "recording": state["recording"]}

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        await asyncio.gather(*(s.close() for s in self.sessions.values()))


def _valid_id(value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (str, int)) or len(str(value)) > 64:
        return False
    try:  # a lone surrogate (a JSON "\ud800" escape) cannot be sent to the msgpack clients the id is echoed to
        str(value).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class WebSocketClient:
    """One connection: a bounded send queue drained by its own task, so a slow client never holds up the
    session (when its queue holds more than `send_queue_seconds` of audio, it is closed)."""

    def __init__(self, ws: ServerConnection, client_id: int, encoding: str, max_queued_samples: int):
        self.ws, self.client_id, self.encoding = ws, client_id, encoding
        self.max_queued_samples = max_queued_samples
        self._queue: asyncio.Queue[tuple[bytes | str, int]] = asyncio.Queue()
        self._queued_samples = 0
        self._dropped = False
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
        self._put(encode_message(message, self.encoding), 0)

    def send_audio(self, frame: bytes, samples: int) -> None:
        if self._queued_samples + samples > self.max_queued_samples:
            self._drop()
            return
        self._queued_samples += samples
        self._put(frame, samples)

    def _put(self, item: bytes | str, samples: int) -> None:
        if not self._dropped:
            self._queue.put_nowait((item, samples))

    def _drop(self) -> None:
        if not self._dropped:
            self._dropped = True
            log.warning("client %s is too slow (more than its send queue of audio behind): closing it", self.client_id)
            asyncio.get_running_loop().create_task(self.ws.close(1013, "too slow: the audio backlog overflowed"))

    async def _send_forever(self) -> None:
        try:
            while True:
                item, samples = await self._queue.get()
                await self.ws.send(item)
                self._queued_samples -= samples
        except ConnectionClosed:
            pass


class Server:
    """Owns the hub and both transports; `run()` serves until `stop()` (or SIGINT / SIGTERM)."""

    def __init__(self, model: MusicModel, bank: DirectionBank | None, bank_paths: list[Path], config: ServerConfig):
        if not is_loopback(config.host) and not config.token:
            raise ValueError(f"binding {config.host} (not loopback) needs a token: pass --token (clients add "
                             f"?token=... to their URL)")
        if config.max_sessions < 1 or not config.idle_seconds > 0:
            raise ValueError(f"max_sessions must be >= 1 and idle_seconds > 0, got {config.max_sessions} and "
                             f"{config.idle_seconds}")
        if config.osc_port is not None and not is_loopback(config.osc_host) and not config.token:
            raise ValueError(f"binding OSC to {config.osc_host} (not loopback) needs a token: pass --token")
        self.config = config
        self.hub = Hub(model, bank, bank_paths, config)
        self._stop = asyncio.Event()
        self.ws_address: tuple[str, int] | None = None
        self.osc_address: tuple[str, int] | None = None
        self._osc = None

    def stop(self) -> None:
        self._stop.set()

    # --- HTTP -----------------------------------------------------------------------------------------

    def _token_ok(self, query: dict[str, list[str]]) -> bool:
        if not self.config.token:
            return True
        given = query.get("token", [""])[0]
        return hmac.compare_digest(given.encode(), self.config.token.encode())

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        query = parse_qs(url.query)
        if url.path == "/ws":
            if not self._token_ok(query):
                return connection.respond(HTTPStatus.FORBIDDEN, "a token is required: add ?token=... to the URL\n")
            return None  # the WebSocket handshake goes on
        if url.path == "/health":
            body = json.dumps({"ok": True, "sessions": sorted(self.hub.sessions)}).encode()
            return Response(200, "OK", Headers([("Content-Type", "application/json"),
                                                ("Content-Length", str(len(body)))]), body)
        if not self._token_ok(query) and url.path in ("/", "/index.html"):
            return connection.respond(HTTPStatus.FORBIDDEN, "a token is required: add ?token=... to the URL\n")
        name = "index.html" if url.path in ("/", "") else url.path.lstrip("/")
        path = WEB_ROOT / name
        # Flat folder only: no "..", no subfolders, nothing outside clients/web.
        if "/" in name or name.startswith(".") or not path.is_file():
            return connection.respond(HTTPStatus.NOT_FOUND, f"not found: {url.path}\n")
        body = path.read_bytes()
        kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if name.endswith(".js"):
            kind = "text/javascript"
        return Response(200, "OK", Headers([("Content-Type", kind + ("; charset=utf-8" if kind.startswith("text") else "")),
                                            ("Content-Length", str(len(body))), ("Cache-Control", "no-store")]), body)

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
            await ws.close(1008, str(exc)[:120])
            return
        client_id = self.hub.next_client_id()
        rate = session.sample_rate
        client = WebSocketClient(ws, client_id, encoding, int(self.config.send_queue_seconds * rate))
        client.send_message(self.hub.hello(session, client_id))
        session.add_listener(client)
        limit = TokenBucket(self.config.messages_per_second, self.config.message_burst)
        log.info("client %s joined session %s", client_id, name)
        try:
            async for frame in ws:
                if not limit.take():
                    client.send_message({"type": "error", "id": None,
                                         "message": f"rate limit: at most {self.config.messages_per_second:g} "
                                                    "messages a second; this one was dropped"})
                    continue
                message_id = None
                try:
                    message = decode_message(frame)
                    message_id = message.get("id")
                    if message_id is not None and not _valid_id(message_id):
                        message_id = None
                        raise ProtocolError("id must be a string (valid Unicode) or an integer, of at most 64 characters")
                    await session.handle(message, Cause("websocket", client_id, message_id))
                    if message["type"] == "get":
                        client.send_message({**session.state_message(), "id": message_id})
                except ProtocolError as exc:
                    if message_id is None and _valid_id(exc.message_id):  # e.g. a NaN in a message with an id
                        message_id = exc.message_id
                    client.send_message({"type": "error", "id": message_id, "message": str(exc)})
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


def new_token() -> str:
    return secrets.token_urlsafe(18)
