"""A test client of the live protocol (docs/protocol.md) over a real WebSocket, for tests against the
`live_server` fixture: a reader thread keeps every control message and every audio frame's header (with
the time it arrived), so a test can wait for what it expects without losing anything else."""

from __future__ import annotations

import json
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Callable

import msgpack
import numpy as np
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from musicrfm.protocol.wire import AudioHeader, is_audio_frame, unpack_audio


@dataclass
class Audio:
    arrived: float  # time.monotonic() when the frame was read
    header: AudioHeader
    pcm: np.ndarray | None


class LiveClient:
    def __init__(self, url: str, *, encoding: str = "json", keep_pcm: bool = False, timeout: float = 30.0,
                 **connect_options: Any):
        self.url, self.encoding, self.keep_pcm = url, encoding, keep_pcm
        self._stack = ExitStack()
        options = dict(proxy=None, open_timeout=timeout, max_size=None, max_queue=None, compression=None)
        self.ws = self._stack.enter_context(connect(url, **{**options, **connect_options}))
        self.messages: list[dict] = []  # control messages, decoded, in arrival order
        self.control_frames: list[bytes | str] = []  # the same, as they came (text or binary)
        self.audio_at: list[int] = []  # for each control message, how many audio frames had arrived before it
        self.audio: list[Audio] = []
        self.closed: ConnectionClosed | None = None  # how the connection ended, once it has
        self.error: BaseException | None = None  # anything else the reader met (a bad frame)
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True, name=f"client {url}")
        self._thread.start()
        self.hello = self.wait(lambda m: m["type"] == "hello", timeout=timeout)

    # --- reading --------------------------------------------------------------------------------------

    def _read(self) -> None:
        try:
            while True:
                frame = self.ws.recv()
                now = time.monotonic()
                if is_audio_frame(frame):
                    header, pcm = unpack_audio(frame)
                    with self._cond:
                        self.audio.append(Audio(now, header, pcm if self.keep_pcm else None))
                        self._cond.notify_all()
                    continue
                message = json.loads(frame) if isinstance(frame, str) else msgpack.unpackb(frame, raw=False)
                with self._cond:
                    self.audio_at.append(len(self.audio))
                    self.control_frames.append(frame)
                    self.messages.append(message)
                    self._cond.notify_all()
        except ConnectionClosed as exc:
            self.closed = exc
        except BaseException as exc:  # noqa: BLE001 - reported by the test that looks at it
            self.error = exc
        finally:
            with self._cond:
                self._cond.notify_all()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

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
                if left <= 0 or not self._thread.is_alive():
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
                if left <= 0 or not self._thread.is_alive():
                    raise AssertionError(f"{len(self.audio) - since} of {count} audio frames within {timeout} s "
                                         f"(connection: {self.closed or self.error or 'open'})")
                self._cond.wait(min(left, 0.5))
            return self.audio[since:since + count]

    def wait_closed(self, timeout: float = 30.0) -> ConnectionClosed | None:
        self._thread.join(timeout)
        return self.closed

    # --- sending --------------------------------------------------------------------------------------

    def send(self, message: dict | str | bytes, encoding: str | None = None) -> None:
        """A dict goes as JSON text (or a msgpack binary frame); str and bytes go as they are."""
        if isinstance(message, dict):
            if (encoding or self.encoding) == "msgpack":
                message = msgpack.packb(message, use_bin_type=True)
            else:
                message = json.dumps(message)
        self.ws.send(message)

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
            self._stack.close()
        except Exception:  # noqa: BLE001 - the server may have closed first
            pass
        self._thread.join(10)

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
