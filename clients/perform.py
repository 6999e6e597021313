"""`musicrfm perform score.toml`: play a score offline (render a WAV) or against a running server.

Both ways send the score's messages to a stopped stream: the initial state, every cue with its `at_step`,
a `stop` at the step where the last frame is complete, then `play`. Offline, they go to a `server.stream.
Stream` in this process; live, over the WebSocket protocol, with the server recording the stream so the
tokens can be compared (`tokens_sha256` of the recorded frames).
"""

from __future__ import annotations

import asyncio
import json
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from musicrfm.protocol.wire import decode_message, encode_message, end_step, is_audio_frame, unpack_audio

from musicrfm.protocol.score import Score, ScoreError


@dataclass
class Performance:
    audio: np.ndarray  # float32 mono
    sample_rate: int
    frames: int
    tokens_sha256: str | None  # of frames [0, frames): offline from the tokens, live from the server's recording
    recording: dict | None = None  # live: the server's `recording` message


def perform_offline(score: Score, *, model_name: str | None = None, device: str | None = None,
                    dtype: str | None = None, banks: list[Path] | None = None, progress: bool = True) -> Performance:
    from musicrfm.engine.cli import DEFAULT_MODEL
    from musicrfm.engine.model import bundled_banks, load_model
    from musicrfm.engine.generation import load_banks, tokens_sha256
    from musicrfm.server.offline import play_messages
    from musicrfm.protocol.wire import ProtocolError

    model = load_model(model_name or score.model or DEFAULT_MODEL, device=device, dtype=dtype)
    if model.frame_rate != score.frame_rate:
        raise ScoreError(f"the score was compiled for {score.frame_rate} frames/s, the model runs at {model.frame_rate}")
    # Named banks first (the command line's, then the score's); otherwise a bundled model's own.
    bank = load_banks(list(banks if banks is not None else score.banks or bundled_banks(model.name)))
    try:
        run = play_messages(model, bank, score.messages(), score.frames, progress=progress)
    except ProtocolError as exc:
        raise ScoreError(f"{score.path or 'score'}: {exc}") from None
    return Performance(run.audio, run.sample_rate, score.frames, tokens_sha256(run.codes))


class PerformError(RuntimeError):
    pass


async def perform_live(score_path: Path, url: str, *, session: str | None = None, token: str | None = None,
                       timeout: float = 600.0, log=print) -> Performance:
    """Play a score on a server: a fresh stream in `session` (default: a new session of its own)."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    from .listen import normalize_url
    from musicrfm.protocol.score import load_score

    session = session or f"perform-{secrets.token_hex(4)}"
    ws_url = normalize_url(url, session=session, token=token, encoding="msgpack")
    try:
        ws = await connect(ws_url, max_size=16 * 1024 * 1024, compression=None)
    except (OSError, asyncio.TimeoutError) as exc:
        raise PerformError(f"cannot reach {ws_url}: {exc}") from None
    async with ws:
        hello = decode_message(await ws.recv())
        if hello.get("type") != "hello":
            raise PerformError(f"expected a hello from the server, got {hello.get('type')!r}")
        score = load_score(score_path, frame_rate=float(hello["frame_rate"]))
        if score.model and score.model != hello["model"]:
            log(f"note: the score names model {score.model}, the server runs {hello['model']}")
        missing = sorted(score.directions() - set(hello["directions"]))
        if missing:
            raise PerformError(f"the server's banks lack {', '.join(missing)} (it has {', '.join(hello['directions'])})")
        if hello.get("random_weights"):
            log(f"note: {hello['note']}")
        last = end_step(score.frames, int(hello["codebooks"]))
        messages = []
        if hello["state"]["playback"] != "stopped":
            messages.append({"type": "transport", "command": "stop"})
        old = [k for k in hello["state"]["directions"] if k not in score.initial.get("directions", {})]
        first = dict(score.messages()[0])
        if old:
            first["directions"] = {**{k: None for k in old}, **first.get("directions", {})}
        messages += [first, *score.messages()[1:]]
        messages += [{"type": "transport", "command": "stop", "at_step": last},
                     {"type": "record", "command": "start"},  # armed: records the stream from its first frame
                     {"type": "transport", "command": "play"}]
        for i, message in enumerate(messages):
            await ws.send(encode_message({**message, "id": f"score-{i}"}, "msgpack"))
        pieces: list[np.ndarray] = []
        recording = None
        expected = 0
        try:
            async with asyncio.timeout(timeout):
                async for frame in ws:
                    if is_audio_frame(frame):
                        header, pcm = unpack_audio(frame)
                        if header.first_sample != expected:
                            raise PerformError(f"audio gap: expected sample {expected}, got {header.first_sample}")
                        expected += header.num_samples
                        pieces.append(pcm)
                        continue
                    message = decode_message(frame)
                    if message["type"] == "error":
                        raise PerformError(f"the server refused {message.get('id')}: {message['message']}")
                    if message["type"] == "warning":
                        log(f"server: {message['message']}")
                    if message["type"] == "recording" and message["status"] == "stopped":
                        recording = message
                        break
        except ConnectionClosed as exc:
            raise PerformError(f"the server closed the connection: {exc}") from None
        except TimeoutError:
            raise PerformError(f"the performance did not finish within {timeout:g} s") from None
    audio = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
    frames = recording["frames"]
    if frames[0] != 0 or frames[1] != score.frames:
        raise PerformError(f"the server recorded frames {frames}, expected [0, {score.frames}]")
    return Performance(audio, int(hello["sample_rate"]), score.frames, recording["tokens_sha256"], recording)


def write_result(out: Path, perf: Performance, score: Score, mode: str) -> None:
    from musicrfm.engine.audio import write_wav

    write_wav(out, perf.audio, perf.sample_rate)
    sidecar = {"format": "musicrfm.performance", "version": 1, "score": str(score.path), "mode": mode,
               "frames": perf.frames, "seconds": score.seconds, "seed": score.seed,
               "tokens_sha256": perf.tokens_sha256, "recording": perf.recording}
    out.with_suffix(".json").write_text(json.dumps(sidecar, indent=2) + "\n")
