"""One session's stream, without any I/O: the engine's decode loop, fed control changes at exact steps.

`Stream` is synchronous and owns the `Generator` and the streaming EnCodec decoder. Changes arrive from
any thread through `submit` (validated there, so a bad one never gets in) and apply between two steps:
the next one, or the `at_step` they name. The live session drives it from a worker thread; `musicrfm
perform` (offline) and `musicrfm replay` drive the very same code in a plain loop, which is why a score
played live and offline, or a recording and its replay, give the same tokens.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from musicrfm.engine.audio import StreamingDecoder
from musicrfm.engine.bank import DirectionBank
from musicrfm.engine.loop import Generator
from musicrfm.engine.model import MusicModel
from musicrfm.engine.steering import SteeringPlan

from musicrfm.protocol.wire import ProtocolError
from .state import TRANSPORT_COMMANDS, ControlState, apply_patch

# Changes a stream may hold for future steps (`at_step`). Changes that come in step order (a score's cues)
# are checked against a cached projection, one patch each; one that goes back in time folds every change
# due before it, so those are limited more tightly: unbounded, a client queueing out-of-order far-future
# changes made each later message cost more, until the event loop (and the audio with it) stalled.
MAX_FUTURE_CHANGES = 4096
MAX_OUT_OF_ORDER_CHANGES = 64


@dataclass(frozen=True)
class Cause:
    """Who asked for a change: echoed in the `state` message it produces."""

    via: str  # "websocket" | "osc" | "score" | "replay" | "server"
    client_id: int | str | None = None
    id: str | int | None = None

    def to_dict(self) -> dict:
        return {"via": self.via, "client_id": self.client_id, "id": self.id}


@dataclass(frozen=True)
class Change:
    """A validated change waiting for its step. kind: "set" (body: a patch), "transport" (body: {"command",
    optional "seed"}) or "state" (body: a whole ControlState, from a recording's log)."""

    kind: str
    body: Any
    cause: Cause
    at_step: int | None = None
    order: int = 0  # submission order: changes due at the same step apply in the order they came


@dataclass(frozen=True)
class Applied:
    """A change as it took effect: the state from `step` on."""

    step: int
    version: int
    epoch: int
    state: ControlState
    cause: Cause


@dataclass
class StreamChunk:
    audio: np.ndarray  # float32 mono
    first_sample: int
    steps: tuple[int, int]
    version: int
    epoch: int
    applied: list[Applied] = field(default_factory=list)
    ended: bool = False  # the stream stopped in this chunk (the decoder's tail is included)
    seconds: float = 0.0  # wall-clock time spent generating and decoding


def parse_change(message: dict, cause: Cause, order: int = 0) -> Change:
    """A `set` or `transport` protocol message -> Change (field checks only; `Stream.submit` checks the
    rest against the state)."""
    kind = message.get("type")
    at_step = message.get("at_step")
    if at_step is not None and (isinstance(at_step, bool) or not isinstance(at_step, int) or not 0 <= at_step < 2**40):
        raise ProtocolError(f"at_step must be a whole step number >= 0, got {at_step!r}")
    if kind == "set":
        body = {k: v for k, v in message.items() if k not in ("type", "id", "at_step")}
        if not body:
            raise ProtocolError("set: nothing to change")
        return Change("set", body, cause, at_step, order)
    if kind == "transport":
        extra = [k for k in message if k not in ("type", "id", "at_step", "command", "seed")]
        if extra:
            raise ProtocolError(f"transport: unknown field {extra[0]!r}")
        command = message.get("command")
        if command not in TRANSPORT_COMMANDS:
            raise ProtocolError(f"transport command must be one of {', '.join(TRANSPORT_COMMANDS)}, got {command!r}")
        body = {"command": command}
        if "seed" in message:
            seed = message["seed"]
            if command != "reset":
                raise ProtocolError("transport: only reset takes a seed")
            if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
                raise ProtocolError(f"transport seed must be a whole number >= 0, got {seed!r}")
            body["seed"] = seed
        return Change("transport", body, cause, at_step, order)
    raise ProtocolError(f"not a control change: {kind!r}")


class Stream:
    """Generation for one session; see the module docstring."""

    def __init__(self, model: MusicModel, bank: DirectionBank | None, state: ControlState = ControlState(), *,
                 context_steps: int | None = None, keep_steps: int | None = None):
        self.model = model
        self.bank = bank
        self.site = bank.injection_point if bank is not None else "residual"
        self.known_keys = frozenset(bank.keys()) if bank is not None else frozenset()
        self.context_steps, self.keep_steps = context_steps, keep_steps
        self.hop = int(model.hop_length)
        self.state = replace(state, playback="stopped")
        self.version = 0
        self.epoch = -1  # the first stream is epoch 0
        self.generator: Generator | None = None
        self.decoder: StreamingDecoder | None = None
        self.samples_emitted = 0
        self.history: list[Applied] = []  # changes since step 0 of the current stream
        self.finished_codes: torch.Tensor | None = None  # tokens of the last stream that ended
        self._pending: list[Change] = []
        self._tail: tuple[ControlState, int] | None = None  # (state after every queued change, its step)
        self._order = 0
        self._lock = threading.Lock()  # guards _pending (submit runs on the event loop, steps in a worker)

    # --- inbox --------------------------------------------------------------------------------------

    @property
    def step(self) -> int:
        return self.generator.step if self.generator is not None else 0

    def submit(self, message: dict, cause: Cause) -> Change:
        """Validate a `set` / `transport` message against the current state and queue it."""
        with self._lock:
            self._order += 1
            change = parse_change(message, cause, self._order)
            new = self._check(change)
            self._pending.append(change)
            if new is not None:  # keep the projection of the whole queue current, for the next check
                at = self._effective_step(change)
                if self._tail is not None and at >= self._tail[1]:
                    self._tail = (new, at)
                else:  # the first in the queue, or out of step order (at most MAX_OUT_OF_ORDER_CHANGES): refold
                    last = max(self._effective_step(c) for c in self._pending)
                    self._tail = (self._projected(last), last)
        return change

    def submit_state(self, state: ControlState, at_step: int, cause: Cause) -> None:
        """Queue a whole state (a recording's log line) for `at_step`."""
        with self._lock:
            self._order += 1
            self._pending.append(Change("state", state, cause, at_step, self._order))
            self._tail = None

    def _projected(self, until: int) -> ControlState:
        """The state once every pending change due by step `until` has applied (what a new change for that
        step will meet, e.g. a score cue that adjusts a direction an earlier cue adds)."""
        state = self.state
        for c in sorted(self._pending, key=lambda c: (self._effective_step(c), c.order)):
            if self._effective_step(c) > until:
                break
            if c.kind == "state":
                state = c.body
            elif c.kind == "set":
                try:
                    state = apply_patch(state, c.body, step=self._effective_step(c), known_keys=self.known_keys)
                except ProtocolError:
                    pass
        return state

    def _check(self, change: Change) -> ControlState | None:
        """Raise ProtocolError if `change` cannot apply; for a `set`, return the state it would make."""
        at = self._effective_step(change)
        future = [c for c in self._pending if c.at_step is not None and c.at_step > self.step]
        in_order = self._tail is not None and at >= self._tail[1]
        if change.at_step is not None and change.at_step > self.step:
            limit = MAX_FUTURE_CHANGES if in_order else MAX_OUT_OF_ORDER_CHANGES
            if len(future) >= limit:
                raise ProtocolError(f"too many changes waiting for a future step ({len(future)}; at most {limit}"
                                    f"{'' if in_order else ' when they come out of step order'}); this one was refused")
        if change.kind == "set":
            base = self._tail[0] if in_order else self._projected(at)
            new = apply_patch(base, change.body, step=at, known_keys=self.known_keys)
            if self.generator is not None:
                try:
                    self.generator.check_sampling(new.sampling)
                except ValueError as exc:
                    raise ProtocolError(f"{exc} (transport reset)") from None
            if new.directions and self.bank is None:
                raise ProtocolError("this server has no direction bank: start it with --bank FILE")
            if new.directions and ("directions" in change.body or "layers" in change.body):
                try:  # what only the bank knows (an explicit weighting's length must match its layers); on the
                    # CPU, so that checking a message never waits for the model's device
                    SteeringPlan.compile(new.to_spec(self.site), self.bank, self.model.fingerprint)
                except ValueError as exc:
                    raise ProtocolError(str(exc)) from None
            return new
        return None

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def _effective_step(self, change: Change) -> int:
        """The step a change applies at: its `at_step`, or the next step if that is past (or not given)."""
        return max(self.step, change.at_step or 0)

    def _due(self) -> list[Change]:
        """Pop the changes due at the current step, in the order they came."""
        with self._lock:
            due = [c for c in self._pending if self._effective_step(c) == self.step]
            if due:
                self._pending = [c for c in self._pending if c not in due]
                if not self._pending:
                    self._tail = None  # rebuilt from the state by the next submit
        return sorted(due, key=lambda c: c.order)

    # --- applying changes ---------------------------------------------------------------------------

    def apply_due(self) -> StreamChunk:
        """Apply what is due now without stepping; the session calls this while no step is running (stopped
        or paused). The chunk holds the decoder's tail when a stop ended the stream."""
        first_sample, epoch, step = self.samples_emitted, self.epoch, self.step
        applied: list[Applied] = []
        tail: list[np.ndarray] = []
        gen = self.generator
        for change in self._due():
            self._apply(change, applied, tail)
        out = np.concatenate(tail).astype(np.float32) if tail else np.zeros(0, np.float32)
        ended = gen is not None and self.generator is not gen
        return StreamChunk(out, first_sample, (step, step), self.version, epoch, applied, ended)

    def _record(self, cause: Cause, step_before: int, applied: list[Applied]) -> None:
        """Count the change and log it, at the step of the stream it now belongs to (a reset's new stream
        starts at 0; a stop belongs to the stream it ended)."""
        self.version += 1
        step = self.step if self.generator is not None else step_before
        entry = Applied(step, self.version, self.epoch, self.state, cause)
        if self.generator is not None:
            self.history.append(entry)
        applied.append(entry)

    def _apply(self, change: Change, applied: list[Applied], tail: list[np.ndarray]) -> None:
        step = self.step
        if change.kind == "transport":
            command = change.body["command"]
            if command in ("stop", "reset") and self.generator is not None:
                tail.append(self._end_stream())
            if command == "reset" and "seed" in change.body:
                self.state = replace(self.state, seed=change.body["seed"])
            if command == "pause" and self.state.playback == "playing":
                self.state = replace(self.state, playback="paused")
            elif command in ("play", "reset") and self.state.playback != "playing":
                if self.generator is None:
                    self._start_stream()
                self.state = replace(self.state, playback="playing")
            self._record(change.cause, step, applied)
            return
        if change.kind == "state":
            new = replace(change.body, playback=self.state.playback)
        else:
            try:  # re-checked at its own step: a schedule shifts by the step it really applies at
                new = apply_patch(self.state, change.body, step=step, known_keys=self.known_keys)
            except ProtocolError:
                return  # checked when submitted; only a racing change can make it fail now
        old, self.state = self.state, new
        gen = self.generator
        if gen is not None:
            if new.prompt != old.prompt:
                gen.set_prompt(new.prompt)
            if new.sampling != old.sampling:
                gen.set_sampling(new.sampling)
            gen.plan = self._plan(new)
        self._record(change.cause, step, applied)

    def _plan(self, state: ControlState) -> SteeringPlan | None:
        if not state.directions:
            return None
        return SteeringPlan.compile(state.to_spec(self.site), self.bank, self.model.fingerprint,
                                    device=self.model.device, dtype=self.model.dtype)

    def _start_stream(self) -> None:
        s = self.state
        self.epoch += 1
        self.generator = Generator(self.model, s.prompt, sampling=s.sampling, seed=s.seed, plan=self._plan(s),
                                   context_steps=self.context_steps, keep_steps=self.keep_steps)
        self.decoder = StreamingDecoder(self.model.hf.audio_encoder)
        self.samples_emitted = 0
        self.history = []

    def _end_stream(self) -> np.ndarray:
        tail = self.decoder.flush().reshape(-1).float().cpu().numpy()
        self.samples_emitted += tail.shape[0]
        self.finished_codes = self.generator.codes()  # the ended stream's tokens, for its recording
        self.generator = self.decoder = None
        self.state = replace(self.state, playback="stopped")
        return tail

    # --- generating ---------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, max_steps: int) -> StreamChunk:
        """Run up to `max_steps` steps while playing, applying due changes before each step, and decode the
        frames they complete. Returns early when a change pauses or ends the stream at its step."""
        started = time.perf_counter()
        first_sample, epoch, start = self.samples_emitted, self.epoch, self.step
        applied: list[Applied] = []
        audio: list[np.ndarray] = []
        codes: list[torch.Tensor] = []
        ended, ran = False, 0
        for _ in range(max_steps):
            due = self._due()
            if due:
                self._decode(codes, audio)  # frames so far go out before a change can end the stream
                gen = self.generator
                for change in due:
                    self._apply(change, applied, audio)
                ended = gen is not None and self.generator is not gen
            if ended or self.state.playback != "playing":
                break
            codes.append(self.generator.chunk(1).codes)
            ran += 1
        self._decode(codes, audio)
        out = np.concatenate(audio).astype(np.float32) if audio else np.zeros(0, np.float32)
        return StreamChunk(out, first_sample, (start, start + ran), self.version, epoch, applied, ended,
                           time.perf_counter() - started)

    def _decode(self, codes: list[torch.Tensor], audio: list[np.ndarray]) -> None:
        if codes:
            pcm = self.decoder.push(torch.cat(codes, dim=1)).reshape(-1).float().cpu().numpy()
            self.samples_emitted += pcm.shape[0]
            audio.append(pcm)
            codes.clear()
