"""Recordings of a live stream (WAV + JSONL control log) and their replay (docs/protocol.md, "Recordings").

The WAV is 16-bit PCM whose header is rewritten after every chunk, and the log is flushed line by line,
so whatever was recorded survives a crash. The log holds the full control state at every step where it
changed since the stream's step 0, which is all `replay` needs to regenerate the same tokens.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from musicrfm.engine.model import MusicModel, load_model
from musicrfm.engine.generation import check_bank_hashes, load_banks, provenance, tokens_sha256

from musicrfm.protocol.wav import WavWriter
from musicrfm.protocol.wire import ProtocolError
from .state import ControlState
from .offline import run_stream  # one loop for live, perform and replay
from .stream import Applied, Cause, Stream, log_line

LOG_FORMAT = "musicrfm.session-log"


class Recorder:
    """One recording of one stream: starts at a frame boundary, ends at `finish`. `max_bytes` bounds the WAV
    and the log together: the audio stops at the last whole frame that fits (`full` says so), so the
    recording stays complete and replayable."""

    def __init__(self, base: Path, stream: Stream, bank_paths: list[Path], *, max_bytes: int | None = None):
        if not stream.history.complete:
            raise ProtocolError("this stream's control history grew too long to replay exactly, so it cannot be "
                                "recorded from the middle: reset it (or stop, record, play) and record the new stream")
        model = stream.model
        self.max_bytes = max_bytes
        self.full = False
        self.log_bytes = 0
        self.wav_path, self.log_path = base.with_suffix(".wav"), base.with_suffix(".jsonl")
        self.epoch = stream.epoch
        self.hop = stream.hop
        self.first_sample = stream.samples_emitted
        self.first_frame = -(-self.first_sample // self.hop)  # ceil: the WAV starts at a frame boundary
        self._skip = self.first_frame * self.hop - self.first_sample  # samples of a partial first frame
        self.wav = WavWriter(self.wav_path, model.sample_rate)
        self._log = open(self.log_path, "w", encoding="utf-8")
        gen = stream.generator
        self._line({
            "type": "header", "format": LOG_FORMAT, "version": 1, **provenance(model, bank_paths),
            "sample_rate": model.sample_rate, "frame_rate": model.frame_rate, "hop": self.hop,
            "context_steps": gen.context_steps, "keep_steps": gen.keep_steps, "epoch": self.epoch,
            "seed": gen.seed, "first_frame": self.first_frame,
        })
        for line in stream.history.lines():  # the stream's controls from step 0 up to now
            self._write(line)
        self._log.flush()

    def _write(self, line: str) -> None:
        self._log.write(line)
        self.log_bytes += len(line.encode())

    def _line(self, obj: dict) -> None:
        self._write(json.dumps(obj, separators=(",", ":")) + "\n")
        self._log.flush()

    def add_state(self, applied: Applied) -> None:
        self._write(log_line(applied))
        self._log.flush()

    def add_audio(self, first_sample: int, audio: np.ndarray, max_samples: int | None = None) -> None:
        """Stream audio from `first_sample`; the part before the recording's first frame is dropped. At most
        `max_samples` in all (and within `max_bytes`), cut at a frame boundary; `full` is set once reached."""
        cut = max(0, self.first_frame * self.hop - first_sample)
        audio = audio[cut:]
        room = max_samples
        if self.max_bytes is not None:  # 2 bytes a sample, the WAV header, and room for the log's end line
            by_bytes = (self.max_bytes - self.log_bytes - 44 - 1024) // 2
            room = by_bytes if room is None else min(room, by_bytes)
        if room is not None:
            room = max(0, room - self.wav.samples) // self.hop * self.hop
            if audio.shape[0] >= room:
                audio, self.full = audio[:room], True
        self.wav.write(audio)

    def finish(self, codes: torch.Tensor) -> dict:
        """Close both files; `codes` [K, >= end frame] are the stream's tokens. Returns the `recording` message."""
        end_frame = self.first_frame + self.wav.samples // self.hop
        end_frame = min(end_frame, int(codes.shape[1]))
        sha = tokens_sha256(codes[:, self.first_frame:end_frame])
        self._line({"type": "end", "frames": [self.first_frame, end_frame], "samples": self.wav.samples,
                    "tokens_sha256": sha})
        self._log.close()
        self.wav.close()
        return {"type": "recording", "status": "stopped", "wav": str(self.wav_path), "log": str(self.log_path),
                "frames": [self.first_frame, end_frame], "tokens_sha256": sha}


@dataclass
class Replay:
    audio: np.ndarray
    sample_rate: int
    codes: torch.Tensor  # the recorded frames [K, end - first]
    header: dict
    tokens_sha256: str
    expected_sha256: str | None  # None: the log has no end line (the recording was cut off)

    @property
    def matches(self) -> bool:
        return self.expected_sha256 is not None and self.expected_sha256 == self.tokens_sha256


def read_log(path: str | os.PathLike) -> tuple[dict, list[tuple[int, dict]], dict | None]:
    """(header, [(step, state dict)], end line or None); ProtocolError names what is wrong."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    if not lines:
        raise ProtocolError(f"{path}: empty session log")
    try:
        records = [json.loads(line) for line in lines if line.strip()]
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"{path}: not a JSONL session log ({exc})") from None
    header = records[0]
    if not isinstance(header, dict) or header.get("format") != LOG_FORMAT:
        raise ProtocolError(f"{path}: not a musicrfm session log (first line must be its header)")
    states, end = [], None
    for r in records[1:]:
        if r.get("type") == "state":
            states.append((int(r["step"]), r["state"]))
        elif r.get("type") == "end":
            end = r
    if not states:
        raise ProtocolError(f"{path}: the log holds no control state")
    return header, states, end


def replay(path: str | os.PathLike, *, model: MusicModel | None = None, chunk_steps: int = 50,
           progress: bool = True) -> Replay:
    """Regenerate a recorded stream from its log; the banks must be the recorded ones (sha256)."""
    header, states, end = read_log(path)
    check_bank_hashes(header["banks"], "log", "recording")
    bank = load_banks([b["path"] for b in header["banks"]])
    if model is None:
        model = load_model(header["model"], device=header["device"], dtype=header["dtype"])
    if model.fingerprint.to_dict() != header["model_fingerprint"]:
        raise ValueError(f"the log was recorded with {header['model']} ({header['model_fingerprint']}); this "
                         f"model is {model.fingerprint.describe()}")
    first = header["first_frame"]
    end_frame = end["frames"][1] if end else None
    if end_frame is None:  # cut off: regenerate up to the last state change plus a second
        end_frame = max(first, max(s for s, _ in states) + round(model.frame_rate))
    cause = Cause("replay")
    stream = Stream(model, bank, context_steps=header["context_steps"], keep_steps=header["keep_steps"])
    keys = stream.known_keys
    initial = ControlState.from_dict({**states[0][1], "playback": "stopped"}, keys)
    stream.state = initial
    for step, state in states[1:]:
        stream.submit_state(ControlState.from_dict({**state, "playback": "stopped"}, keys), step, cause)
    result = run_stream(stream, end_frame, chunk_steps=chunk_steps, progress=progress)
    codes = result.codes[:, first:end_frame]
    audio = result.audio[first * stream.hop:end_frame * stream.hop]
    return Replay(audio, model.sample_rate, codes, header, tokens_sha256(codes), end["tokens_sha256"] if end else None)
