"""Offline runs of a live stream: a score's messages (`musicrfm perform --out`) or a recording's states
(`musicrfm replay`) through the same `Stream` a live session uses, as fast as the machine allows."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from musicrfm.engine.bank import DirectionBank
from musicrfm.engine.model import MusicModel

from musicrfm.protocol.wire import end_step
from .state import ControlState
from .stream import Cause, Stream


@dataclass
class OfflineRun:
    audio: np.ndarray  # float32 mono, from the stream's first sample
    codes: torch.Tensor  # [K, frames]
    sample_rate: int
    stream: Stream


def run_stream(stream: Stream, frames: int, *, chunk_steps: int = 50, progress: bool = True) -> OfflineRun:
    """Play a stopped stream (its pending changes apply at their steps) until `frames` frames are complete,
    then stop it there, exactly as a live `transport stop` with that `at_step` does."""
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    last = end_step(frames, stream.model.num_codebooks)
    cause = Cause("score")
    stream.submit({"type": "transport", "command": "stop", "at_step": last}, cause)
    stream.submit({"type": "transport", "command": "play"}, cause)
    pieces = [stream.apply_due().audio]
    with tqdm(total=last, unit="step", disable=not progress,
              desc=stream.model.progress_label("performing")) as bar:
        while stream.state.playback == "playing":
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
