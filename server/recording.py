"""Recordings of a live stream (WAV + JSONL control log) and their replay (docs/protocol.md, "Recordings").

The WAV is 16-bit PCM whose header is rewritten after every chunk, and the log is flushed line by line,
so whatever was recorded survives a crash. The log holds the full control state at every step where it
changed since the stream's step 0, which is all `replay` needs to regenerate the same tokens.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from musicrfm.engine.audio import DECODINGS, decoding_of, streaming_decoder
from musicrfm.engine.model import MusicModel, load_model
from musicrfm.engine.norms import with_layer_norms
from musicrfm.engine.steering import legacy_spec, steerable_keys
from musicrfm.engine.generation import check_bank_entries, check_bank_hashes, load_banks, provenance, tokens_sha256

from musicrfm.protocol import fields
from musicrfm.protocol.wav import WavWriter, read_wav, to_pcm16
from musicrfm.protocol.wire import ProtocolError, end_step
from .state import ControlState
from .offline import run_stream  # one loop for live, perform and replay
from .stream import Applied, Cause, Stream, log_line

LOG_FORMAT = "musicrfm.session-log"
# 2: states carry strength `units` ("relative" by default) and the layer weighting a margin, and the header the
# layer norms; version 1 logs were raw units and exact min-max, and are read as such.
LOG_VERSION = 2

# What `replay` accepts (a log is a file anyone can edit: a step of 1e11 must not mean a run of years).
# The longest stream a replay regenerates, from step 0 to the recording's last frame: a day.
MAX_REPLAY_SECONDS = 24 * 3600
# A state line may name a step at most this far past the recording's last frame: the stream runs a chunk
# or two ahead of the audio it has written (the codebook delay, the decoder's hold-back, a chunk in
# flight), never a minute. Lines past the end within it are kept but never apply.
MAX_LOG_SECONDS_PAST_END = 60
# The regenerated audio matches the recorded WAV when no sample differs by more than this (full scale 1):
# the streaming decoder agrees with itself across chunkings to ~1e-5 (docs/streaming-decode.md), the WAV
# is 16-bit; anything edited or generated differently differs by far more.
REPLAY_AUDIO_TOLERANCE = 1e-3


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
            "type": "header", "format": LOG_FORMAT, "version": LOG_VERSION, **provenance(model, bank_paths, stream.bank),
            "sample_rate": model.sample_rate, "frame_rate": model.frame_rate, "hop": self.hop,
            "context_steps": gen.context_steps, "keep_steps": gen.keep_steps, "epoch": self.epoch,
            "seed": gen.seed, "first_frame": self.first_frame, "decoding": decoding_of(stream.decoder),
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
class SessionLog:
    """A recording's log as read: the header, the state lines (step, state, line number) and the end line
    (None: the recording was cut off). `partial`: a last line cut off mid-write (a crash) was left out."""

    path: Path
    header: dict
    states: list[tuple[int, dict, int]]
    end: dict | None
    lines: int
    partial: bool = False


_HEADER_FIELDS: dict[str, Any] = {  # key -> check(where, value)
    "model": lambda w, v: _string(w, v),
    "model_fingerprint": lambda w, v: fields.fields(w, v, ("architecture", "num_layers", "hidden_size"),
                                                    error=ProtocolError),
    "device": lambda w, v: _string(w, v),
    "dtype": lambda w, v: _string(w, v),
    "banks": lambda w, v: check_bank_entries(w, v, error=ProtocolError),
    "sample_rate": lambda w, v: fields.whole(w, v, 1, 10**6, error=ProtocolError),
    "frame_rate": lambda w, v: fields.number(w, v, 1e-3, 1e4, error=ProtocolError),
    "hop": lambda w, v: fields.whole(w, v, 1, 10**6, error=ProtocolError),
    "context_steps": lambda w, v: fields.whole(w, v, 1, 2**31, error=ProtocolError),
    "keep_steps": lambda w, v: fields.whole(w, v, 0, 2**31, error=ProtocolError),
    "epoch": lambda w, v: fields.whole(w, v, 0, 2**63, error=ProtocolError),
    "seed": lambda w, v: fields.whole(w, v, 0, 2**63, error=ProtocolError),
    "first_frame": lambda w, v: fields.whole(w, v, 0, 2**40, error=ProtocolError),
}


def recorded_decoding(header: dict) -> str:
    """How a log's WAV was decoded: its header says so; logs written before the exact EnCodec decoder (2026-12-01)
    say nothing, and their WAVs were windowed."""
    return header.get("decoding", "windowed")


def _string(where: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ProtocolError(f"{where} must be a string, got {fields.shown(value)}")
    return value


def _json_line(where: str, raw: bytes) -> dict:
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise ProtocolError(f"{where}: not a JSON line of a session log ({why})") from None
    if not isinstance(record, dict):
        raise ProtocolError(f"{where}: a log line must be a JSON object, got {type(record).__name__}")
    return record


def load_log(path: str | os.PathLike) -> SessionLog:
    """Read a recording's log up to its last whole line and check every value in it (before any model is
    loaded); ProtocolError names the file, the line and the problem."""
    path = Path(path)
    data = path.read_bytes()
    whole, _, rest = data.rpartition(b"\n")  # the Recorder ends every line with a newline
    raw_lines = whole.split(b"\n") if whole else []
    if not raw_lines:
        raise ProtocolError(f"{path}: empty session log (no whole line)")
    header = _json_line(f"{path} line 1", raw_lines[0])
    if header.get("format") != LOG_FORMAT:
        raise ProtocolError(f"{path}: not a musicrfm session log (first line must be its header)")
    version = header.get("version")
    if isinstance(version, bool) or version not in (1, LOG_VERSION):
        raise ProtocolError(f"{path}: session log version {fields.shown(version, 40)} is not supported (1 or "
                            f"{LOG_VERSION})")
    for key, check in _HEADER_FIELDS.items():
        if key not in header:
            raise ProtocolError(f"{path}: the header (line 1) lacks {key!r}")
        check(f"{path} header {key}", header[key])
    if recorded_decoding(header) not in DECODINGS[1:]:
        raise ProtocolError(f"{path} header decoding must be one of {', '.join(DECODINGS[1:])}, got "
                            f"{fields.shown(header['decoding'])}")
    states: list[tuple[int, dict, int]] = []
    end = None
    for n, raw in enumerate(raw_lines[1:], start=2):
        if not raw.strip():
            continue
        where = f"{path} line {n}"
        record = _json_line(where, raw)
        if end is not None:
            raise ProtocolError(f"{where}: a line after the end line")
        kind = record.get("type")
        if kind == "state":
            step = fields.whole(f"{where} step", record.get("step"), 0, 2**40, error=ProtocolError)
            if states and step < states[-1][0]:
                raise ProtocolError(f"{where}: step {step} comes before the previous line's {states[-1][0]}")
            if not isinstance(record.get("state"), dict):
                raise ProtocolError(f"{where}: a state line's state must be an object, got "
                                    f"{fields.shown(record.get('state'))}")
            states.append((step, legacy_spec(record["state"]) if version == 1 else record["state"], n))
        elif kind == "end":
            end = _end_line(where, record, header)
        else:
            raise ProtocolError(f"{where}: unknown line type {fields.shown(kind, 40)}")
    if not states:
        raise ProtocolError(f"{path}: the log holds no control state")
    return SessionLog(path, header, states, end, len(raw_lines), partial=bool(rest.strip()))


def _end_line(where: str, record: dict, header: dict) -> dict:
    frames = record.get("frames")
    if not (isinstance(frames, list) and len(frames) == 2):
        raise ProtocolError(f"{where}: frames must be [first, end], got {fields.shown(frames)}")
    first = fields.whole(f"{where} frames[0]", frames[0], 0, 2**40, error=ProtocolError)
    last = fields.whole(f"{where} frames[1]", frames[1], first, 2**40, error=ProtocolError)
    if first != header["first_frame"]:
        raise ProtocolError(f"{where}: frames start at {first}, the header's first_frame is {header['first_frame']}")
    samples = fields.whole(f"{where} samples", record.get("samples"), 0, 2**40, error=ProtocolError)
    if last - first > samples // header["hop"]:
        raise ProtocolError(f"{where}: {last - first} frames cannot fit in {samples} samples")
    sha = record.get("tokens_sha256")
    if not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
        raise ProtocolError(f"{where}: tokens_sha256 must be 64 hex digits, got {fields.shown(sha)}")
    return record


def read_log(path: str | os.PathLike) -> tuple[dict, list[tuple[int, dict]], dict | None]:
    """(header, [(step, state dict)], end line or None); ProtocolError names what is wrong."""
    log = load_log(path)
    return log.header, [(step, state) for step, state, _ in log.states], log.end


@dataclass
class Replay:
    audio: np.ndarray
    sample_rate: int
    codes: torch.Tensor  # the recorded frames [K, end - first]
    header: dict
    tokens_sha256: str
    expected_sha256: str | None  # None: the log has no end line (the recording was cut off)
    log: SessionLog | None = None
    recorded_samples: int | None = None  # the WAV beside the log (None: no WAV)
    compared_samples: int = 0  # how many of them were compared with the regenerated audio
    audio_difference: float | None = None  # the largest difference among those (full scale 1)
    problems: list[str] = field(default_factory=list)  # what differs from the recording

    @property
    def matches(self) -> bool:
        return self.expected_sha256 is not None and self.expected_sha256 == self.tokens_sha256

    @property
    def ok(self) -> bool:
        """Nothing that could be compared differs (tokens where the log has an end line, the WAV's samples)."""
        return not self.problems


@dataclass(frozen=True)
class ReplayPlan:
    """What a replay will regenerate, from the log and the WAV alone (no model): frames [first, end)."""

    log: SessionLog
    first: int
    end: int
    recorded: np.ndarray | None  # the WAV's samples (None: no WAV beside the log)
    how: str  # where `end` comes from, for the user
    problems: tuple[str, ...] = ()


def plan_replay(path: str | os.PathLike) -> ReplayPlan:
    """Read and check a log (and the WAV beside it): which frames a replay regenerates, refusing values no
    recording can hold. Raises ProtocolError / ValueError naming the file and the problem."""
    log = load_log(path)
    h = log.header
    hop, rate, first = h["hop"], h["frame_rate"], h["first_frame"]
    wav_path = log.path.with_suffix(".wav")
    recorded, problems = None, []
    if wav_path.is_file():
        recorded, wav_rate = read_wav(wav_path)
        if wav_rate != h["sample_rate"]:
            raise ProtocolError(f"{wav_path}: {wav_rate} Hz, the log says {h['sample_rate']} Hz")
    if log.end is not None:
        end, how = log.end["frames"][1], "its end line"
        if recorded is not None and recorded.shape[0] != log.end["samples"]:
            problems.append(f"{wav_path} holds {recorded.shape[0]} samples, the log's end line says "
                            f"{log.end['samples']}")
    elif recorded is not None:
        end, how = first + recorded.shape[0] // hop, f"the WAV ({recorded.shape[0]} samples)"
    else:  # cut off and no WAV: a second past the last change, as far as anything says
        end, how = max(first, log.states[-1][0]) + round(rate), "the last change plus a second (no WAV, no end line)"
    limit = round(MAX_REPLAY_SECONDS * rate)
    if end > limit:
        raise ProtocolError(f"{log.path}: the recording would end at frame {end}, past what replay regenerates "
                            f"({limit} frames: {MAX_REPLAY_SECONDS} s)")
    if end <= first:
        raise ProtocolError(f"{log.path}: the recording holds no whole frame (first frame {first}, end {end})")
    past = end_step(end, 64) + round(MAX_LOG_SECONDS_PAST_END * rate)  # 64: more codebooks than any model has
    for step, _, n in log.states:
        if step > past:
            raise ProtocolError(f"{log.path} line {n}: step {step} is past the recording, which ends at frame {end} "
                                f"(a state line may come at most {MAX_LOG_SECONDS_PAST_END} s after it)")
    return ReplayPlan(log, first, end, recorded, how, tuple(problems))


def replay(path: str | os.PathLike, *, model: MusicModel | None = None, chunk_steps: int = 50,
           progress: bool = True, plan: ReplayPlan | None = None) -> Replay:
    """Regenerate a recorded stream from its log; the banks must be the recorded ones (sha256). Compares
    what it can: the tokens with the end line's hash, the audio with the WAV's samples. `plan`: the
    log's `plan_replay`, when the caller has it already."""
    plan = plan or plan_replay(path)
    log, header, first, end_frame = plan.log, plan.log.header, plan.first, plan.end
    check_bank_hashes(header["banks"], "log", "recording")
    bank = load_banks([b["path"] for b in header["banks"]])
    keys = frozenset(steerable_keys(bank))
    states = []  # every line checked before the model loads
    for step, state, n in log.states:
        try:
            states.append((step, ControlState.from_dict({**state, "playback": "stopped"}, keys)))
        except ProtocolError as exc:
            raise ProtocolError(f"{log.path} line {n}: {exc}") from None
    if model is None:
        model = load_model(header["model"], device=header["device"], dtype=header["dtype"])
    if model.fingerprint.to_dict() != header["model_fingerprint"]:
        raise ValueError(f"the log was recorded with {header['model']} ({header['model_fingerprint']}); this "
                         f"model is {model.fingerprint.describe()}")
    if any(state.steering.units == "relative" and state.directions for _, state in states):
        try:
            bank = with_layer_norms(bank, model, header.get("layer_norms"))
        except ValueError as exc:
            raise ProtocolError(f"{log.path} header layer_norms: {exc}") from None
    cause = Cause("replay")
    decoding = recorded_decoding(header)
    stream = Stream(model, bank, context_steps=header["context_steps"], keep_steps=header["keep_steps"],
                    decoding=decoding)
    stream.state = states[0][1]
    upcoming = iter(states[1:])
    waiting = next(upcoming, None)

    def feed(until: int) -> None:
        """Queue the log's states due before step `until` (in order: each is checked once)."""
        nonlocal waiting
        while waiting is not None and waiting[0] < until:
            stream.submit_state(waiting[1], waiting[0], cause)
            waiting = next(upcoming, None)

    result = run_stream(stream, end_frame, chunk_steps=chunk_steps, progress=progress, feed=feed)
    hop = stream.hop
    codes = result.codes[:, first:end_frame]
    audio = result.audio[first * hop:end_frame * hop]
    out = Replay(audio, model.sample_rate, codes, header, tokens_sha256(codes),
                 log.end["tokens_sha256"] if log.end else None, log, problems=list(plan.problems))
    if out.expected_sha256 is not None and not out.matches:
        out.problems.append(f"tokens differ from the recording: {out.tokens_sha256} != {out.expected_sha256}")
    if plan.recorded is not None:
        _compare_audio(out, plan.recorded, hop, streaming_decoder(model.hf.audio_encoder, decoding).hold_back)
    return out


def _compare_audio(out: Replay, recorded: np.ndarray, hop: int, held: int) -> None:
    """The WAV's samples against the regenerated ones, leaving out the last frames before the end: there the
    recording's decoder had not yet seen what came next (or flushed), the replay's flushed."""
    out.recorded_samples = recorded.shape[0]
    n = min(recorded.shape[0], out.audio.shape[0]) - (held + 1) * hop
    if n <= 0:
        return
    mine = to_pcm16(out.audio[:n]).astype(np.int32)
    theirs = np.round(recorded[:n] * 32768.0).astype(np.int32)  # read_wav's scale back to the file's PCM
    diff = np.abs(mine - theirs)
    out.compared_samples, out.audio_difference = n, float(diff.max()) / 32767.0
    if out.audio_difference > REPLAY_AUDIO_TOLERANCE:
        where = int(np.argmax(diff > REPLAY_AUDIO_TOLERANCE * 32767.0))
        out.problems.append(f"the recorded WAV differs from the regenerated audio from sample {where} "
                            f"(frame {out.header['first_frame'] + where // hop}) on: largest difference "
                            f"{out.audio_difference:.4f} of full scale")
