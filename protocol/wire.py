"""The wire format of docs/protocol.md: audio frames and control-message encoding.

This module is the public contract between the server and its clients, so it imports nothing heavy (no
torch, no model): `clients/` imports it and nothing else from `server/`.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

PROTOCOL_VERSION = 1
AUDIO_MAGIC = b"MRFA"
AUDIO_HEADER_VERSION = 1
# magic, header version, header size, control version, sample rate, first sample, step start, step end,
# epoch, num samples
_AUDIO_HEADER = struct.Struct("<4sHHIIQIIII")
AUDIO_HEADER_BYTES = _AUDIO_HEADER.size  # 40

MAX_MESSAGE_BYTES = 64 * 1024
DEFAULT_WS_PORT = 8765
DEFAULT_OSC_PORT = 9000
SESSION_NAME_MAX = 64


class ProtocolError(ValueError):
    """A message a client sent that the protocol does not allow; the text names the problem."""

    message_id: Any = None  # the offending message's `id`, when it could be read (decode_message sets it)


@dataclass(frozen=True)
class AudioHeader:
    control_version: int
    sample_rate: int
    first_sample: int
    step_start: int
    step_end: int
    epoch: int
    num_samples: int


def pack_audio(header: AudioHeader, samples: np.ndarray) -> bytes:
    """One binary audio frame: the 40-byte header, then float32 little-endian mono PCM."""
    pcm = np.ascontiguousarray(samples, dtype="<f4")
    if pcm.ndim != 1 or pcm.shape[0] != header.num_samples:
        raise ValueError(f"audio frame: header says {header.num_samples} samples, got shape {pcm.shape}")
    head = _AUDIO_HEADER.pack(AUDIO_MAGIC, AUDIO_HEADER_VERSION, AUDIO_HEADER_BYTES, header.control_version,
                              header.sample_rate, header.first_sample, header.step_start, header.step_end,
                              header.epoch, header.num_samples)
    return head + pcm.tobytes()


def unpack_audio(frame: bytes) -> tuple[AudioHeader, np.ndarray]:
    """Parse a binary audio frame; ProtocolError if it is not one."""
    if len(frame) < AUDIO_HEADER_BYTES or frame[:4] != AUDIO_MAGIC:
        raise ProtocolError("not an audio frame (no MRFA header)")
    magic, version, size, *fields = _AUDIO_HEADER.unpack_from(frame)
    if size < AUDIO_HEADER_BYTES or size > len(frame):
        raise ProtocolError(f"audio frame: bad header size {size}")
    header = AudioHeader(*fields)
    pcm = np.frombuffer(frame, dtype="<f4", offset=size)
    if pcm.shape[0] != header.num_samples:
        raise ProtocolError(f"audio frame: header says {header.num_samples} samples, frame holds {pcm.shape[0]}")
    return header, pcm.astype(np.float32)


def is_audio_frame(frame: bytes | str) -> bool:
    return isinstance(frame, (bytes, bytearray, memoryview)) and bytes(frame[:4]) == AUDIO_MAGIC


def decode_message(frame: bytes | str) -> dict:
    """A client message from a text (JSON) or binary (msgpack) frame -> dict with a string 'type'."""
    try:
        if isinstance(frame, str):
            message = json.loads(frame)  # NaN / Infinity literals parse, then check_finite names where they are
        else:
            import msgpack

            message = msgpack.unpackb(bytes(frame), raw=False, strict_map_key=True)
    except ProtocolError:
        raise
    except Exception as exc:  # json.JSONDecodeError, msgpack's ExtraData / FormatError / ValueError, ...
        kind = "JSON" if isinstance(frame, str) else "msgpack"
        raise ProtocolError(f"malformed {kind} message: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"a message must be an object with a 'type', got {type(message).__name__}")
    try:
        if not isinstance(message.get("type"), str):
            raise ProtocolError("a message needs a string 'type'")
        check_finite(message)
    except ProtocolError as exc:
        exc.message_id = message.get("id")  # the message was read: its error can still carry its id
        raise
    return message


MAX_NESTING = 32  # objects / arrays within each other in one message (the protocol needs 5)


def check_finite(value: Any, where: str = "message") -> None:
    """Refuse NaN / inf anywhere (msgpack floats carry them, and JSON its NaN / Infinity literals), and
    nesting deeper than MAX_NESTING (msgpack decodes ~1000 levels: recursing over them, or printing them in an
    error, would overflow Python's stack). Iterative; every message is checked, so a first pass only looks (a
    60 KB message holds ~12,000 values), and the path named in an error is only found for it."""
    if not _finite_and_shallow(value):
        _name_the_problem(value, where)


_PLAIN = frozenset({str, int, bool, type(None), bytes})  # what a decoder gives that cannot be a problem


def _finite_and_shallow(value: Any) -> bool:
    level, depth = [value], 0
    while level:
        deeper: list = []
        for v in level:
            if type(v) in _PLAIN:
                continue
            if isinstance(v, float):
                if not math.isfinite(v):
                    return False
                continue
            if isinstance(v, dict):
                deeper.extend(v.values())
            elif isinstance(v, (list, tuple)):
                deeper.extend(v)
            else:
                continue
            if depth >= MAX_NESTING:  # a container this deep
                return False
        level, depth = deeper, depth + 1
    return True


def _name_the_problem(value: Any, where: str) -> None:
    """Raise the ProtocolError naming where `check_finite`'s first pass found a problem."""
    todo: list[tuple[Any, tuple | None, int]] = [(value, None, 0)]  # (value, (parent path, key) or None, depth)
    while todo:
        value, path, depth = todo.pop()
        if isinstance(value, float) and not math.isfinite(value):
            raise ProtocolError(f"{_path(where, path)} holds {value}: numbers must be finite")
        if isinstance(value, (dict, list, tuple)):
            if depth >= MAX_NESTING:
                raise ProtocolError(f"{_path(where, path)}: nested more than {MAX_NESTING} levels deep")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            todo.extend((v, (path, k if isinstance(value, dict) else [k]), depth + 1) for k, v in items)


def _path(where: str, path: tuple | None) -> str:
    parts = []
    while path is not None:
        path, key = path
        parts.append(f"[{key[0]}]" if isinstance(key, list) else f".{str(key)[:40]}")
    return where + "".join(reversed(parts))


def encode_message(message: dict, encoding: str = "json") -> bytes | str:
    """A message for the wire: JSON text, or a msgpack binary frame (a `SharedMessage` is encoded once per
    encoding, however many clients it goes to)."""
    if isinstance(message, SharedMessage):
        return message.encoded(encoding)
    return _encode(message, encoding)


def _encode(message: dict, encoding: str) -> bytes | str:
    if encoding == "json":
        return json.dumps(message, separators=(",", ":"), allow_nan=False)
    if encoding == "msgpack":
        import msgpack

        return msgpack.packb(message, use_bin_type=True)
    raise ValueError(f"unknown encoding {encoding!r}; choose json or msgpack")


def end_step(frames: int, codebooks: int) -> int:
    """The generation step at which `frames` frames are complete: step s writes codebook k of frame s - k,
    so the last codebook of frame `frames - 1` comes at step frames + codebooks - 2, and a stop at the next
    step ends the stream with exactly `frames` frames."""
    return frames + codebooks - 1


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses: binding anything else needs a token."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def valid_session_name(name: str) -> bool:
    return (isinstance(name, str) and 0 < len(name) <= SESSION_NAME_MAX
            and all(c.isascii() and (c.isalnum() or c in "-_") for c in name))


class SharedMessage(dict):
    """A message that goes to many clients (a session's `state`, `stats`, ...): `encode_message` encodes it once
    per encoding and hands every client the same frame. Not to be changed once sent."""

    __slots__ = ("_frames",)

    def encoded(self, encoding: str) -> bytes | str:
        try:
            frames = self._frames
        except AttributeError:
            frames = self._frames = {}
        frame = frames.get(encoding)
        if frame is None:
            frame = frames[encoding] = _encode(self, encoding)
        return frame
