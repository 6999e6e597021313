"""`musicrfm perform score.toml --url URL`: play a score on a running server (the live half of `perform`).

The score's messages go to a stopped stream: the initial state, every cue with its `at_step`, a `stop`
at the step where the last frame is complete, then `play`, with the server recording the stream so the
tokens can be compared (`tokens_sha256` of the recorded frames). The offline half (`--out` alone) plays
the same messages on a `Stream` in this process: `musicrfm.server.offline.perform_score`. The command
line that picks between them is the root's (`musicrfm.perform`), since clients never import the server.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from musicrfm.protocol.connection import AudioFrame, Closed, ConnectError, Connection, describe_close
from musicrfm.protocol.score import Score, load_score
from musicrfm.protocol.wav import write_wav
from musicrfm.protocol.wire import end_step


@dataclass
class Performance:
    audio: np.ndarray  # float32 mono
    sample_rate: int
    frames: int
    tokens_sha256: str | None  # of frames [0, frames): offline from the tokens, live from the server's recording
    recording: dict | None = None  # live: the server's `recording` message


class PerformError(RuntimeError):
    pass


async def perform_live(score_path: Path, url: str, *, session: str | None = None, token: str | None = None,
                       timeout: float = 600.0, log=print) -> Performance:
    """Play a score on a server: a fresh stream in `session` (default: a new session of its own)."""
    session = session or f"perform-{secrets.token_hex(4)}"
    try:
        conn = await Connection.open(url, session=session, token=token, encoding="msgpack")
    except ConnectError as exc:
        raise PerformError(str(exc)) from None
    async with conn:
        hello = conn.hello
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
            await conn.send({**message, "id": f"score-{i}"})
        pieces: list[np.ndarray] = []
        recording = None
        expected = 0
        try:
            async with asyncio.timeout(timeout):
                while True:
                    message = await conn.recv()
                    if isinstance(message, AudioFrame):
                        header = message.header
                        if header.first_sample != expected:
                            raise PerformError(f"audio gap: expected sample {expected}, got {header.first_sample}")
                        expected += header.num_samples
                        pieces.append(message.pcm)
                        continue
                    if message["type"] == "error":
                        raise PerformError(f"the server refused {message.get('id')}: {message['message']}")
                    if message["type"] == "warning":
                        log(f"server: {message['message']}")
                    if message["type"] == "recording" and message["status"] == "stopped":
                        recording = message
                        break
        except Closed as exc:
            raise PerformError(f"the server closed the connection: {describe_close(exc.code, exc.reason)}") from None
        except TimeoutError:
            raise PerformError(f"the performance did not finish within {timeout:g} s") from None
    audio = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
    frames = recording["frames"]
    if frames[0] != 0 or frames[1] != score.frames:
        raise PerformError(f"the server recorded frames {frames}, expected [0, {score.frames}]")
    return Performance(audio, int(hello["sample_rate"]), score.frames, recording["tokens_sha256"], recording)


def write_result(out: Path, perf: Performance, score: Score, mode: str) -> None:
    """The performance's WAV and its .json sidecar (the same for both halves; `mode` says which)."""
    write_wav(out, perf.audio, perf.sample_rate)
    sidecar = {"format": "musicrfm.performance", "version": 1, "score": str(score.path), "mode": mode,
               "frames": perf.frames, "seconds": score.seconds, "seed": score.seed,
               "tokens_sha256": perf.tokens_sha256, "recording": perf.recording}
    out.with_suffix(".json").write_text(json.dumps(sidecar, indent=2) + "\n")
