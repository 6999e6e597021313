"""One client connection to a `musicrfm serve` session (docs/protocol.md): every client uses it.

`listen`, `perform --url`, the latency bench and the tests all need the same few things: turn whatever
the user typed into the session's `ws://` URL, join, read the `hello`, send control messages, receive
control messages and audio frames, close cleanly, and say plainly why joining failed. `Connection` does
those and nothing else; what a client does with the stream (a jitter buffer, a performance that stops at
its last step, a test's contiguity checks) stays with the client.

    async with await Connection.open("localhost:8765", session="main") as conn:
        print(conn.hello["model"])
        await conn.send({"type": "transport", "command": "play", "id": "p"})
        async for item in conn:           # until the connection closes
            if isinstance(item, AudioFrame):
                ...                       # item.header (first_sample, epoch, ...), item.pcm (float32)
            elif item["type"] == "state":
                ...

Joining fails with `ConnectError` (its text is the whole story: unreachable, refused handshake, no hello,
closed before the hello); a refused handshake is a `HandshakeRefused` with the HTTP status. Once joined,
`recv` raises `Closed` (with the close code and reason) when the connection ends, and `async for` stops.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np

from .wire import (DEFAULT_WS_PORT, AudioHeader, ProtocolError, decode_message, encode_message, is_audio_frame,
                   is_loopback, unpack_audio, valid_session_name)

__all__ = ["normalize_url", "redact", "describe_close", "ConnectError", "HandshakeRefused", "Closed", "AudioFrame",
           "parse_frame", "Connection", "MAX_FRAME_BYTES"]

MAX_FRAME_BYTES = 16 * 1024 * 1024  # an audio frame of 1 s at 32 kHz is 128 KiB; leave plenty of room


# --- URLs -------------------------------------------------------------------------------------------


def normalize_url(url: str, *, session: str | None = None, token: str | None = None,
                  encoding: str | None = "msgpack") -> str:
    """Any reasonable way of naming a server -> its `ws://HOST:PORT/ws?session=...` URL.

    Accepts `ws://host:port/ws?session=x`, `wss://...`, the page's `http(s)://host:port/?session=x` and a bare
    `host[:port]` (port 8765 if none). `session` and `token` override the URL's; `encoding` is always set
    (None: the URL's own, if it names one; the server's default, JSON, otherwise).
    """
    text = url.strip()
    if not text:
        raise ValueError("empty URL; expected ws://HOST:PORT/ws?session=NAME or HOST:PORT")
    bare = "://" not in text
    parts = urlsplit(text if not bare else "ws://" + text)
    scheme = parts.scheme.lower()
    schemes = {"ws": "ws", "wss": "wss", "http": "ws", "https": "wss"}
    if scheme not in schemes:
        raise ValueError(f"URL {url!r}: scheme {parts.scheme!r} is not one of ws, wss, http, https")
    if not parts.hostname:
        raise ValueError(f"URL {url!r} names no host")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"URL {url!r}: bad port") from None
    netloc = parts.netloc
    if bare and port is None:
        netloc = f"{netloc}:{DEFAULT_WS_PORT}"
    path = parts.path
    if path in ("", "/"):
        path = "/ws"
    elif scheme in ("http", "https") and not path.rstrip("/").endswith("/ws"):
        path = path.rstrip("/") + "/ws"  # the page at .../ -> its socket at .../ws
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    if session is not None:
        query["session"] = session
    query.setdefault("session", "main")
    if not valid_session_name(query["session"]):
        raise ValueError(f"session name {query['session']!r}: use letters, digits, '-' and '_' (at most 64)")
    if token is not None:
        query["token"] = token
    if encoding is not None:
        query["encoding"] = encoding
    return urlunsplit((schemes[scheme], netloc, path, urlencode(query), ""))


def redact(url: str) -> str:
    """The URL without its token (for printing)."""
    parts = urlsplit(url)
    query = [(k, "..." if k == "token" else v) for k, v in parse_qsl(parts.query, keep_blank_values=True)]
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query, safe="."), ""))


def describe_close(code: int | None, reason: str) -> str:
    """A close code as a person reads it: 'code 1013 (try again later: ...): reason'."""
    names = {1000: "normal", 1001: "going away", 1006: "connection lost", 1008: "policy violation",
             1009: "message too big", 1011: "server error", 1013: "try again later: this client fell behind"}
    if code is None:
        return "connection lost"
    text = f"code {code}" + (f" ({names[code]})" if code in names else "")
    return text + (f": {reason}" if reason else "")


# --- what can go wrong ------------------------------------------------------------------------------


class ConnectError(RuntimeError):
    """Joining a session failed (unreachable server, refused handshake, no hello): the text is the whole story."""


class HandshakeRefused(ConnectError):
    """The server answered the WebSocket handshake with an HTTP error (403: a token is needed or wrong)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class Closed(Exception):
    """The connection ended: `code` and `reason` of the close frame the other side sent (1006, "": none
    came, the connection was lost)."""

    def __init__(self, code: int | None, reason: str = ""):
        super().__init__(describe_close(code, reason))
        self.code, self.reason = code, reason


# --- frames -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AudioFrame:
    """One binary audio frame: its header (stream position, epoch, ...) and float32 mono samples."""

    header: AudioHeader
    pcm: np.ndarray


def parse_frame(frame: bytes | str) -> dict | AudioFrame:
    """A frame from the server -> an `AudioFrame` or a control message (dict); ProtocolError if it is neither."""
    if is_audio_frame(frame):
        return AudioFrame(*unpack_audio(bytes(frame)))
    return decode_message(frame)


# --- the connection ---------------------------------------------------------------------------------


class Connection:
    """A joined session: `hello` read, control messages sent in the URL's encoding, frames received."""

    def __init__(self, ws, url: str, hello: dict, hello_frame: bytes | str):
        self._ws = ws
        self.url = url  # with its token; print `redact(url)`
        self.hello = hello
        self.hello_frame = hello_frame  # as it came: JSON text, or a msgpack binary frame
        self.encoding = dict(parse_qsl(urlsplit(url).query)).get("encoding", "json")

    @classmethod
    async def open(cls, url: str, *, session: str | None = None, token: str | None = None,
                   encoding: str | None = "msgpack", open_timeout: float = 10.0, hello_timeout: float = 10.0,
                   max_size: int | None = MAX_FRAME_BYTES, max_queue: int | None = 16) -> "Connection":
        """Join the session `url` names (normalised by `normalize_url` with `session`, `token`, `encoding`)
        and read its hello. Audio frames before the hello are skipped (the stream is not known yet)."""
        from websockets.asyncio.client import connect
        from websockets.exceptions import InvalidHandshake, InvalidStatus, InvalidURI

        url = normalize_url(url, session=session, token=token, encoding=encoding)
        shown = redact(url)
        options = dict(open_timeout=open_timeout, max_size=max_size, max_queue=max_queue, compression=None)
        if "proxy" in inspect.signature(connect.__init__).parameters and is_loopback(urlsplit(url).hostname or ""):
            options["proxy"] = None  # websockets >= 15 follows HTTP(S)_PROXY by default; never for this machine
        try:
            ws = await connect(url, **options)
        except InvalidStatus as exc:
            status = exc.response.status_code
            # The server says why (a token, a Host or an Origin it does not take); else a guess from the status.
            said = (exc.response.body or b"").decode("utf-8", "replace").strip().splitlines()
            hint = {401: " (a token is needed: --token)", 403: " (a token is needed or wrong: --token)",
                    404: " (is the path /ws?)"}.get(status, "")
            why = f": {said[0][:200]}{hint if status == 404 else ''}" if said else hint
            raise HandshakeRefused(f"{shown}: the server refused the WebSocket: HTTP {status}{why}", status) from None
        except InvalidURI as exc:
            raise ConnectError(f"bad URL {shown}: {exc}") from None
        except (OSError, asyncio.TimeoutError, InvalidHandshake) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else (str(exc) or type(exc).__name__)
            if isinstance(exc, ConnectionRefusedError):
                why = "connection refused (is `musicrfm serve` running there?)"
            elif isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
                why = f"no answer within {open_timeout:g} s"
            raise ConnectError(f"cannot connect to {shown}: {why}") from None
        try:
            hello, frame = await _read_hello(ws, shown, hello_timeout)
        except BaseException:
            await ws.close(1000)
            raise
        return cls(ws, url, hello, frame)

    # -- sending

    async def send(self, message: dict) -> None:
        """A control message, in the connection's encoding; Closed if the connection has ended."""
        await self.send_frame(encode_message(message, self.encoding))

    async def send_frame(self, frame: bytes | str) -> None:
        """A frame as it is (text or binary): what a test of the server's input checks needs."""
        from websockets.exceptions import ConnectionClosed

        try:
            await self._ws.send(frame)
        except ConnectionClosed:
            raise Closed(self._ws.close_code, self._ws.close_reason or "") from None

    # -- receiving

    async def recv_frame(self) -> bytes | str:
        """The next frame as it came; Closed once the connection has ended."""
        from websockets.exceptions import ConnectionClosed

        try:
            return await self._ws.recv()
        except ConnectionClosed:
            raise Closed(self._ws.close_code, self._ws.close_reason or "") from None

    async def recv(self) -> dict | AudioFrame:
        """The next control message or audio frame (ProtocolError if the server sent neither)."""
        return parse_frame(await self.recv_frame())

    def __aiter__(self) -> "Connection":
        return self

    async def __anext__(self) -> dict | AudioFrame:
        """`async for item in conn`: every message and frame until the connection ends."""
        try:
            return await self.recv()
        except Closed:
            raise StopAsyncIteration from None

    # -- closing

    @property
    def close_code(self) -> int | None:
        """None while open; after the end, the code of the close frame (1006: none came)."""
        return self._ws.close_code

    @property
    def close_reason(self) -> str:
        return self._ws.close_reason or ""

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close with the handshake (the server sees `code`); nothing to do if it has ended already."""
        await self._ws.close(code, reason)

    async def __aenter__(self) -> "Connection":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def _read_hello(ws, shown: str, timeout: float) -> tuple[dict, bytes | str]:
    from websockets.exceptions import ConnectionClosed

    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ConnectError(f"{shown}: no hello from the server within {timeout:g} s (is this a musicrfm server?)")
        try:
            frame = await asyncio.wait_for(ws.recv(), timeout=left)
        except asyncio.TimeoutError:
            continue
        except ConnectionClosed:
            raise ConnectError(f"{shown}: the server closed the connection before its hello: "
                               f"{describe_close(ws.close_code, ws.close_reason)}") from None
        if is_audio_frame(frame):
            continue
        try:
            message = decode_message(frame)
        except ProtocolError as exc:
            raise ConnectError(f"{shown}: the server's first message is not a hello ({exc})") from None
        if message["type"] == "error":
            raise ConnectError(f"the server refused: {message.get('message', message)}")
        if message["type"] != "hello":
            raise ConnectError(f"{shown}: expected a hello first, got {message['type']!r}")
        return message, frame
