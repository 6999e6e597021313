"""WAV files, the one implementation: every file the project writes and every WAV it reads goes through here.

What is written is always 16-bit PCM mono with the canonical 44-byte header (byte for byte what the stdlib
`wave` module writes): `write_wav` for a whole signal, `encode_wav` for its bytes (written atomically by the
caller), `WavWriter` for audio that arrives in chunks (recordings, `listen --out`). The streaming writer
patches the header's two sizes after every chunk and flushes, so the file on disk is a valid WAV of
everything written so far, even if the process dies before `close`.

Two readers of one parser: `decode_wav` takes what SynTheory's originals and the MIDI renderer produce
(integer PCM of 8 to 32 bits, IEEE float, WAVE_FORMAT_EXTENSIBLE, the 0xFFFFFFFF size a streaming writer
leaves) and returns every channel; `read_wav` is the strict reader of the project's own files: 16-bit PCM
only, a truncated file is an error, channels are averaged to mono.

Plain numpy and struct (no torch), so clients can write WAVs too.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["to_pcm16", "encode_wav", "write_wav", "check_writable", "WavWriter", "WavFormat", "decode_wav",
           "read_wav"]

_PCM = 1  # WAVE_FORMAT_PCM
_FLOAT = 3  # WAVE_FORMAT_IEEE_FLOAT
_EXTENSIBLE = 0xFFFE
_HEADER_BYTES = 44
_STREAMING_SIZE = 0xFFFFFFFF  # the data size a writer that never came back to patch it leaves


# --- writing ----------------------------------------------------------------------------------------


def to_pcm16(audio: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1] -> little-endian int16 (values outside are clipped)."""
    return np.round(np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2")


def _header(sample_rate: int, data_bytes: int) -> bytes:
    """The canonical header of a mono 16-bit PCM file holding `data_bytes` of samples."""
    return struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 36 + data_bytes, b"WAVE", b"fmt ", 16, _PCM, 1,
                       sample_rate, sample_rate * 2, 2, 16, b"data", data_bytes)


def _check_rate(sample_rate: int) -> int:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive int, got {sample_rate!r}")
    return int(sample_rate)


def encode_wav(pcm: np.ndarray, sample_rate: int) -> bytes:
    """A whole mono 16-bit WAV file in memory, from int16 samples (see `to_pcm16`)."""
    data = np.ascontiguousarray(pcm, dtype="<i2").reshape(-1).tobytes()
    return _header(_check_rate(sample_rate), len(data)) + data


def check_writable(path: str | os.PathLike, what: str = "--out") -> Path:
    """`path` as a file that can be written, checked before the work that fills it (a model load, a
    generation): its parent directory exists and takes new files, and the path is not a directory. A
    missing parent is refused, not created: a typo in a folder name should not make a new tree. ValueError
    names `what` (the option) and the problem in one line. Nothing is left behind: the probe file that
    proves the directory takes files (os.access says yes to root even on /proc or a read-only mount) is
    deleted at once."""
    import tempfile

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a directory; give a file name, e.g. {path / 'out.wav'}")
    parent = path.parent
    if not parent.is_dir():
        problem = "is not a directory" if parent.exists() else "does not exist (create it first)"
        raise ValueError(f"{what} {path}: the folder {parent} {problem}")
    try:
        with tempfile.TemporaryFile(dir=parent, prefix=".musicrfm-write-check-"):
            pass
    except OSError as exc:
        raise ValueError(f"{what} {path}: cannot write in {parent} ({exc.strerror or exc})") from None
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{what} {path}: the file exists and is not writable")
    return path


def write_wav(path: str | os.PathLike, audio: np.ndarray, sample_rate: int) -> None:
    """Write mono float audio in [-1, 1] as 16-bit PCM (values outside are clipped).

    Integer input is refused (int16 PCM? 0/1? writing either as float would make silence or full-scale
    noise), and so are NaN / inf (they have no PCM value): better no file than a wrong one.
    """
    audio = np.asarray(audio)
    if not np.issubdtype(audio.dtype, np.floating):
        raise ValueError(f"audio must be floating point in [-1, 1], got dtype {audio.dtype}")
    if audio.ndim != 1:
        raise ValueError(f"audio must be mono, shape [samples], got {audio.shape}")
    if not np.isfinite(audio).all():
        bad = int(np.count_nonzero(~np.isfinite(audio)))
        raise ValueError(f"audio has {bad} NaN or infinite samples; refusing to write {os.fspath(path)}")
    Path(path).write_bytes(encode_wav(to_pcm16(audio), _check_rate(sample_rate)))


class WavWriter:
    """A mono 16-bit WAV written as audio arrives; the file is valid after every `write`.

    Each write appends the samples, rewrites the header's RIFF and data sizes in place and flushes, so a
    reader (or a crash) at any moment finds a complete file. NaN becomes silence (a live stream must not
    stop over one bad sample); values outside [-1, 1] are clipped.
    """

    def __init__(self, path: str | os.PathLike, sample_rate: int):
        self.path = Path(path)
        self.sample_rate = _check_rate(sample_rate)
        self.samples = 0
        self._file = open(self.path, "wb")
        self._file.write(_header(self.sample_rate, 0))
        self._file.flush()

    def write(self, audio: np.ndarray) -> None:
        audio = np.asarray(audio).reshape(-1)
        if not audio.size:
            return
        self._file.write(to_pcm16(np.nan_to_num(audio)).tobytes())
        self.samples += int(audio.size)
        data_bytes = 2 * self.samples
        self._file.seek(4)
        self._file.write(struct.pack("<I", 36 + data_bytes))
        self._file.seek(40)
        self._file.write(struct.pack("<I", data_bytes))
        self._file.seek(0, os.SEEK_END)
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "WavWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- reading ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WavFormat:
    """What a WAV's `fmt ` chunk says, and its sample data."""

    format_tag: int  # 1 integer PCM, 3 IEEE float (an extensible file's real tag)
    channels: int
    sample_rate: int
    bits: int
    block_align: int
    data: bytes  # the data chunk, as much of it as the file holds
    declared_bytes: int | None  # the data chunk's size in its header (None: a streaming writer's 0xFFFFFFFF)


def parse_wav(data: bytes, *, where: str = "WAV data") -> WavFormat:
    """Find the `fmt ` and `data` chunks of a RIFF/WAVE file; ValueError naming `where` if it is not one."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError(f"{where}: not a RIFF/WAVE file")
    fmt = payload = declared = None
    pos = 12
    while pos + 8 <= len(data):
        chunk_id, size = data[pos:pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        body = pos + 8
        if chunk_id == b"fmt ":
            fmt = data[body:body + size]
        elif chunk_id == b"data":
            # 0xFFFFFFFF (or a size past the end) is what streaming writers leave: take the rest
            payload = data[body:body + size] if size != _STREAMING_SIZE else data[body:]
            declared = size if size != _STREAMING_SIZE else None
            break
        pos = body + size + (size & 1)  # chunks are word-aligned
    if fmt is None or len(fmt) < 16:
        raise ValueError(f"{where}: no usable 'fmt ' chunk")
    if payload is None:
        raise ValueError(f"{where}: no 'data' chunk")
    tag, channels, rate, _, block_align, bits = struct.unpack_from("<HHIIHH", fmt)
    if tag == _EXTENSIBLE and len(fmt) >= 26:  # WAVE_FORMAT_EXTENSIBLE: the real tag opens the GUID
        tag = struct.unpack_from("<H", fmt, 24)[0]
    if channels < 1 or rate < 1 or bits < 8 or block_align != channels * (bits // 8):
        raise ValueError(f"{where}: inconsistent format (channels={channels}, rate={rate}, bits={bits})")
    return WavFormat(tag, channels, rate, bits, block_align, payload, declared)


def decode_wav(data: bytes, *, where: str = "WAV data") -> tuple[np.ndarray, int]:
    """Parse a RIFF/WAVE file: returns (float32 samples [frames, channels] in [-1, 1], rate).

    Handles integer PCM (8, 16, 24, 32 bit), IEEE float (32, 64 bit) and WAVE_FORMAT_EXTENSIBLE; a data
    chunk cut short is read up to its last whole frame.
    """
    wav = parse_wav(data, where=where)
    frames = len(wav.data) // wav.block_align
    raw = wav.data[:frames * wav.block_align]
    tag, bits = wav.format_tag, wav.bits
    if tag == _PCM and bits == 8:
        samples = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif tag == _PCM and bits == 16:
        samples = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif tag == _PCM and bits == 24:
        triples = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        value = triples[:, 0] | (triples[:, 1] << 8) | (triples[:, 2] << 16)
        value = np.where(value >= 1 << 23, value - (1 << 24), value)
        samples = value.astype(np.float32) / float(1 << 23)
    elif tag == _PCM and bits == 32:
        samples = (np.frombuffer(raw, "<i4").astype(np.float64) / 2.0**31).astype(np.float32)
    elif tag == _FLOAT and bits in (32, 64):
        samples = np.frombuffer(raw, "<f4" if bits == 32 else "<f8").astype(np.float32)
    else:
        raise ValueError(f"{where}: unsupported sample format (format tag {tag}, {bits} bit)")
    return samples.reshape(frames, wav.channels), wav.sample_rate


def read_wav(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Read a 16-bit PCM WAV file as float32 mono in [-1, 1) (channels averaged) and its sample rate.

    Strict, for the project's own files: another sample format, or a data chunk shorter than its header
    says (a file cut off mid-copy), is a ValueError naming the file.
    """
    name = os.fspath(path)
    wav = parse_wav(Path(name).read_bytes(), where=name)
    if wav.format_tag != _PCM or wav.bits != 16:
        kind = "float" if wav.format_tag == _FLOAT else "integer" if wav.format_tag == _PCM else \
            f"format-{wav.format_tag}"
        raise ValueError(f"{name}: only 16-bit PCM WAV is supported, this file has {wav.bits}-bit {kind} samples")
    if wav.declared_bytes is not None and len(wav.data) < wav.declared_bytes:
        raise ValueError(f"{name}: WAV data is truncated ({len(wav.data)} bytes, header promises "
                         f"{wav.declared_bytes})")
    frames = len(wav.data) // wav.block_align
    pcm = np.frombuffer(wav.data[:frames * wav.block_align], dtype="<i2").reshape(frames, wav.channels)
    return (pcm.astype(np.float32) / 32768.0).mean(axis=1, dtype=np.float32), wav.sample_rate
