"""Offline runs of a live stream: a score's messages (`musicrfm perform --out`) or a recording's states
(`musicrfm replay`) through the same `Stream` a live session uses, as fast as the machine allows.

An offline performance is a live one without the sockets: the score's messages go to a stopped `Stream`
in this process, exactly as `perform --url` sends them to a server's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from musicrfm.engine.bank import DirectionBank
from musicrfm.engine.model import MusicModel
from musicrfm.engine.steering import steerable_keys

from musicrfm.protocol.score import Score, ScoreError
from musicrfm.protocol.wire import ProtocolError, end_step
from .state import ControlState, apply_patch
from .stream import Cause, Stream


@dataclass
class OfflineRun:
    audio: np.ndarray  # float32 mono, from the stream's first sample
    codes: torch.Tensor  # [K, frames]
    sample_rate: int
    stream: Stream


def run_stream(stream: Stream, frames: int, *, chunk_steps: int = 50, progress: bool = True,
               feed: Callable[[int], None] | None = None) -> OfflineRun:
    """Play a stopped stream (its pending changes apply at their steps) until `frames` frames are complete,
    then stop it there, exactly as a live `transport stop` with that `at_step` does.

    `feed(until)`, when given, is called before the stream starts and before each chunk to queue the changes
    due before step `until`: a recording's log, fed as it comes due rather than queued all at once, so a log
    of any length replays (the queue for live clients is bounded: MAX_FUTURE_CHANGES)."""
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    last = end_step(frames, stream.model.num_codebooks)
    cause = Cause("score")
    # The stop goes in first, while the queue is empty: fed changes then queue in front of it.
    stream.submit({"type": "transport", "command": "stop", "at_step": last}, cause)
    if feed is not None:
        feed(min(chunk_steps, last))
    stream.submit({"type": "transport", "command": "play"}, cause)
    pieces = [stream.apply_due().audio]
    with tqdm(total=last, unit="step", disable=not progress,
              desc=stream.model.progress_label("performing")) as bar:
        while stream.state.playback == "playing":
            if feed is not None:
                feed(stream.step + chunk_steps)
            chunk = stream.generate(chunk_steps)
            bar.update(chunk.steps[1] - chunk.steps[0])
            pieces.append(chunk.audio)
    codes = stream.finished_codes[:, :frames]
    return OfflineRun(np.concatenate(pieces), codes, stream.model.sample_rate, stream)


def play_messages(model: MusicModel, bank: DirectionBank | None, messages: list[dict], frames: int, *,
                  initial: ControlState = ControlState(), chunk_steps: int = 50, progress: bool = True,
                  context_steps: int | None = None, keep_steps: int | None = None) -> OfflineRun:
    """Apply protocol messages (`set` / `transport`, each with its `at_step`) to a new stream."""
    stream = Stream(model, bank, initial, context_steps=context_steps, keep_steps=keep_steps)
    cause = Cause("score")
    for message in messages:
        stream.submit(message, cause)
    return run_stream(stream, frames, chunk_steps=chunk_steps, progress=progress)


def check_messages(messages: list[dict], bank: DirectionBank | None) -> None:
    """Apply a score's `set` messages in order to a fresh state, as the stream will (no model needed):
    ProtocolError names the first that cannot apply, before a model is loaded for nothing."""
    keys = frozenset(steerable_keys(bank))
    state = ControlState()
    for message in messages:
        body = {k: v for k, v in message.items() if k not in ("type", "id", "at_step")}
        at = message.get("at_step") or 0
        try:
            state = apply_patch(state, body, step=at, known_keys=keys)
        except ProtocolError as exc:
            raise ProtocolError(f"the cue at step {at}: {exc}" if at else f"the starting state: {exc}") from None
        if state.directions and bank is None:
            raise ProtocolError("names directions, but no direction bank is loaded (--bank FILE)")


def perform_score(score: Score, *, model_name: str | None = None, device: str | None = None,
                  dtype: str | None = None, banks: list[Path] | None = None, progress: bool = True) -> OfflineRun:
    """A score played here (`musicrfm perform --out` without `--url`): its model (or `model_name`), the
    named banks (the command line's, then the score's) or a bundled model's own, its messages on a fresh
    stream until its last frame is complete. The messages are checked before the model loads."""
    from musicrfm.engine.cli import DEFAULT_MODEL
    from musicrfm.engine.generation import load_banks
    from musicrfm.engine.model import bundled_banks, load_model
    from musicrfm.engine.norms import with_layer_norms

    name = model_name or score.model or DEFAULT_MODEL
    bank = load_banks(list(banks if banks is not None else score.banks or bundled_banks(name)))
    try:
        check_messages(score.messages(), bank)
    except ProtocolError as exc:
        raise ScoreError(f"{score.path or 'score'}: {exc}") from None
    model = load_model(name, device=device, dtype=dtype)
    bank = with_layer_norms(bank, model)
    if model.frame_rate != score.frame_rate:
        raise ScoreError(f"the score was compiled for {score.frame_rate} frames/s, the model runs at {model.frame_rate}")
    try:
        return play_messages(model, bank, score.messages(), score.frames, progress=progress)
    except ProtocolError as exc:
        raise ScoreError(f"{score.path or 'score'}: {exc}") from None
