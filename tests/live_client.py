"""A blocking test client of the live protocol over a real WebSocket, for tests against the `live_server`
fixture: `protocol.connection.Connection` on an event loop of its own thread, whose reader keeps every
control message (decoded, and as it came) and every audio frame's header (with the time it arrived), so
a test can wait for what it expects without losing anything else."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
import time
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import Any, Callable

import msgpack
import numpy as np
from websockets.client import ClientProtocol
from websockets.frames import Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

from musicrfm.protocol.connection import AudioFrame, Closed, Connection, parse_frame
from musicrfm.protocol.wire import AudioHeader, is_audio_frame


@dataclass
class Audio:
    arrived: float  # time.monotonic() when the frame was read
    header: AudioHeader
    pcm: np.ndarray | None


class LiveClient:
    """Joins `url` as it is (no encoding added: the server's default is JSON); `encoding` is how `send`
    encodes dicts. A refused handshake raises `HandshakeRefused` (with the HTTP status)."""

    def __init__(self, url: str, *, encoding: str = "json", keep_pcm: bool = False, timeout: float = 30.0):
        self.url, self.encoding, self.keep_pcm = url, encoding, keep_pcm
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, daemon=True, name=f"client {url}")
        self._loop_thread.start()
        try:
            self.connection = self._call(Connection.open(url, encoding=None, open_timeout=timeout,
                                                         hello_timeout=timeout, max_size=None, max_queue=None))
        except BaseException:
            self._stop_loop()
            raise
        self.hello = self.connection.hello
        self.messages: list[dict] = [self.hello]  # control messages, decoded, in arrival order
        self.control_frames: list[bytes | str] = [self.connection.hello_frame]  # the same, as they came
        self.audio_at: list[int] = [0]  # for each control message, how many audio frames had arrived before it
        self.audio: list[Audio] = []
        self.closed: Closed | None = None  # how the connection ended, once it has
        self.error: BaseException | None = None  # anything else the reader met (a bad frame)
        self._cond = threading.Condition()
        self._reader: Future = asyncio.run_coroutine_threadsafe(self._read(), self._loop)

    def _call(self, coroutine, timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join(10)
        if not self._loop_thread.is_alive():
            self._loop.close()

    # --- reading --------------------------------------------------------------------------------------

    async def _read(self) -> None:
        try:
            while True:
                frame = await self.connection.recv_frame()
                now = time.monotonic()
                item = parse_frame(frame)
                with self._cond:
                    if isinstance(item, AudioFrame):
                        self.audio.append(Audio(now, item.header, item.pcm if self.keep_pcm else None))
                    else:
                        self.audio_at.append(len(self.audio))
                        self.control_frames.append(frame)
                        self.messages.append(item)
                    self._cond.notify_all()
        except Closed as exc:
            self.closed = exc
        except BaseException as exc:  # noqa: BLE001 - reported by the test that looks at it
            self.error = exc
        finally:
            with self._cond:
                self._cond.notify_all()

    @property
    def alive(self) -> bool:
        return not self._reader.done()

    def mark(self) -> int:
        """The index the next control message will have (wait(..., since=mark) looks from there)."""
        with self._cond:
            return len(self.messages)

    def audio_mark(self) -> int:
        with self._cond:
            return len(self.audio)

    def wait(self, predicate: Callable[[dict], bool], *, since: int = 0, timeout: float = 20.0) -> dict:
        """The first control message from index `since` on for which predicate(message) holds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            i = since
            while True:
                while i < len(self.messages):
                    if predicate(self.messages[i]):
                        return self.messages[i]
                    i += 1
                left = deadline - time.monotonic()
                if left <= 0 or not self.alive:
                    recent = [json.dumps(m)[:200] for m in self.messages[since:][-8:]]
                    raise AssertionError(f"no matching message within {timeout} s (connection: "
                                         f"{self.closed or self.error or 'open'}); the last ones:\n"
                                         + "\n".join(recent))
                self._cond.wait(min(left, 0.5))

    def wait_audio(self, count: int, *, since: int = 0, timeout: float = 30.0) -> list[Audio]:
        """Wait until `count` audio frames arrived from index `since` on; returns them."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.audio) < since + count:
                left = deadline - time.monotonic()
                if left <= 0 or not self.alive:
                    raise AssertionError(f"{len(self.audio) - since} of {count} audio frames within {timeout} s "
                                         f"(connection: {self.closed or self.error or 'open'})")
                self._cond.wait(min(left, 0.5))
            return self.audio[since:since + count]

    def wait_closed(self, timeout: float = 30.0) -> Closed | None:
        wait_futures([self._reader], timeout)
        return self.closed

    # --- sending --------------------------------------------------------------------------------------

    def send(self, message: dict | str | bytes, encoding: str | None = None) -> None:
        """A dict goes as JSON text (NaN literals allowed: tests send what a careless client would) or a
        msgpack binary frame; str and bytes go as they are. Closed if the connection has ended."""
        if isinstance(message, dict):
            if (encoding or self.encoding) == "msgpack":
                message = msgpack.packb(message, use_bin_type=True)
            else:
                message = json.dumps(message)
        self._call(self.connection.send_frame(message), 30)

    def request(self, message: dict, *, timeout: float = 20.0) -> dict:
        """Send a message with an id and wait for the `state` or `error` that echoes the id."""
        mark = self.mark()
        self.send(message)
        return self.wait(lambda m: m["type"] in ("state", "error") and _id_of(m) == message["id"], since=mark,
                         timeout=timeout)

    def get_state(self, *, timeout: float = 20.0) -> dict:
        """The session's state, as the answer to a `get` (the first `state` after sending it)."""
        mark = self.mark()
        self.send({"type": "get"})
        return self.wait(lambda m: m["type"] == "state", since=mark, timeout=timeout)

    def close(self) -> None:
        try:
            self._call(self.connection.close(), 30)
        except Exception:  # noqa: BLE001 - the server may have closed first
            pass
        wait_futures([self._reader], 10)
        self._stop_loop()

    def __enter__(self) -> "LiveClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _id_of(message: dict) -> Any:
    if message["type"] == "error":
        return message.get("id")
    return (message.get("cause") or {}).get("id")


def contiguity_problems(frames: list[Audio]) -> list[str]:
    """Where consecutive audio frames break the protocol's rule: same epoch, each first sample the previous
    one's first sample plus its length."""
    problems = []
    for a, b in zip(frames, frames[1:]):
        ha, hb = a.header, b.header
        if hb.epoch != ha.epoch:
            problems.append(f"epoch {ha.epoch} -> {hb.epoch} at sample {hb.first_sample}")
        elif hb.first_sample != ha.first_sample + ha.num_samples:
            problems.append(f"epoch {hb.epoch}: frame at {ha.first_sample} (+{ha.num_samples}) is followed by one "
                            f"at {hb.first_sample}")
    return problems


class RawClient:
    """A WebSocket client on a plain socket with a tiny receive buffer, that reads only when asked to (the
    protocol logic is websockets' sans-I/O ClientProtocol): a client that stops reading, or vanishes."""

    def __init__(self, server, session: str, rcvbuf: int = 4096):
        self.protocol = ClientProtocol(parse_uri(server.ws_url(session)), max_size=None)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(30)
        self.sock.connect(("127.0.0.1", server.port))
        self.protocol.send_request(self.protocol.connect())
        self._flush()
        self.frames: list = []  # text / binary frames read so far
        self.close_code: int | None = None
        while not any(isinstance(e, Response) for e in self._read_some()):
            pass
        assert self.protocol.handshake_exc is None, self.protocol.handshake_exc
        while not any(f.opcode == Opcode.TEXT for f in self.frames):
            self._read_some()
        self.hello = json.loads(next(f for f in self.frames if f.opcode == Opcode.TEXT).data)

    def _flush(self) -> None:
        data = b"".join(self.protocol.data_to_send())
        if data:
            self.sock.sendall(data)

    def _read_some(self) -> list:
        data = self.sock.recv(65536)
        if data:
            self.protocol.receive_data(data)
        else:
            self.protocol.receive_eof()
        events = self.protocol.events_received()
        for e in events:
            if not isinstance(e, Response):
                if e.opcode in (Opcode.TEXT, Opcode.BINARY):
                    self.frames.append(e)
                elif e.opcode == Opcode.CLOSE and self.protocol.close_rcvd is not None:
                    self.close_code = self.protocol.close_rcvd.code
        if not data and self.close_code is None:
            self.close_code = -1  # the connection ended without a close frame
        return events

    def send_json(self, message: dict) -> None:
        self.protocol.send_text(json.dumps(message).encode())
        self._flush()

    def audio_frames(self) -> int:
        return sum(1 for f in self.frames if f.opcode == Opcode.BINARY and is_audio_frame(f.data))

    def read_until_closed(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while self.close_code is None and time.monotonic() < deadline:
            self._read_some()
        return self.close_code

    def abort(self) -> None:
        """Vanish: no close frame, and a TCP reset rather than a FIN."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()
