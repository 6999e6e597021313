"""One session's stream, without any I/O: the engine's decode loop, fed control changes at exact steps.

`Stream` is synchronous and owns the `Generator` and the streaming EnCodec decoder. Changes arrive from
any thread through `submit` (validated there, so a bad one never gets in) and apply between two steps:
the next one, or the `at_step` they name. The live session drives it from a worker thread; `musicrfm
perform` (offline) and `musicrfm replay` drive the very same code in a plain loop, which is why a score
played live and offline, or a recording and its replay, give the same tokens.

A knob's path to the residual stream, in 6 hops:

1. a WebSocket `set` (server/app.py -> `decode_message`: JSON / msgpack, every number finite) or an OSC
   message (server/osc.py `translate`: address and typed arguments -> the same `set` message);
2. `Session.handle` -> `Stream.submit`: `parse_change` reads the envelope (type, at_step);
3. `Stream._checked`, once, for the step the change will apply at and on the state it will meet there (the
   state the change queued before it makes, or the current one): `state.apply_patch` checks the message's
   shape and the protocol's bounds, and each value is checked by the engine type that holds it
   (`DirectionControl`, `Schedule`, `LayerWeighting`, `SteeringSpec`, `SamplingConfig`; the checks
   themselves are `protocol.fields`); the new state's `SteeringPlan` is compiled on the CPU, or re-used
   when only coefficients, schedules, the gate, rows or rule changed. The `Change` carries both;
4. at its step, `Stream._apply` installs the carried state and the carried plan, moved to the model's
   device, as `Generator.plan`;
5. `Engine.step` (this stream with the others of its lane: `generate_together`) asks each plan for the step's
   steering: `plan.at(steps)` -> `StepSteering`, stacked row by row into a `BatchSteering`;
6. `MusicgenDecoder.step` adds each row's vector at each layer, by its rule, rows and site.

A change that comes out of step order is checked where it goes in the queue, and the changes after it are
checked again on it. A change that meets another state or step than the one it was checked for (a stop
restarts the step count; another change applied first) is checked again when it applies, on what it meets.
"""

from __future__ import annotations

import bisect
import json
import math
import threading
import time
import zlib
from dataclasses import dataclass, field, replace
from typing import Any, Iterator

import numpy as np
import torch

from musicrfm.engine.audio import AnyStreamingDecoder, push_together, streaming_decoder
from musicrfm.engine.bank import DirectionBank
from musicrfm.engine.loop import Engine, Generator
from musicrfm.engine.model import MusicModel
from musicrfm.engine.norms import with_layer_norms
from musicrfm.engine.steering import SteeringPlan, steerable_keys

from musicrfm.protocol import fields
from musicrfm.protocol.wire import ProtocolError
from .state import TRANSPORT_COMMANDS, ControlState, apply_patch

# Changes a stream may hold for future steps (`at_step`). Changes that come in step order (a score's cues)
# are checked once each, on the state the change queued before them makes; one that goes back in time makes
# every change queued after it be checked again, so those are limited more tightly: unbounded, a client
# queueing out-of-order far-future changes made each later message cost more, until the event loop (and the
# audio with it) stalled.
MAX_FUTURE_CHANGES = 4096
MAX_OUT_OF_ORDER_CHANGES = 64
# A stream's control history (what a recording started mid-stream writes first), compressed. At ~20 bytes a step
# where something changed, this holds hours of knob turning; past it, a recording needs a new stream.
MAX_HISTORY_BYTES = 2 * 1024 * 1024
# Prompt changes in a live session (`Stream.pace_prompts`): encoding a prompt holds up generation (a 2,000-character
# prompt took 0.5 s on tiny-random, whose tokenizer reads characters), so after an encoding that took d seconds a
# change to another prompt applies PROMPT_MIN_SECONDS, or d / PROMPT_ENCODE_SHARE, later at the earliest: it waits,
# with the changes that came after it, and whatever prompts come meanwhile are encoded once, the last of them.
# Unbounded, a stream of distinct long prompts encoded one every step or two and the audio fell far behind.
PROMPT_MIN_SECONDS = 0.1
PROMPT_ENCODE_SHARE = 0.25


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
    optional "seed"}) or "state" (body: a whole ControlState, from a recording's log).

    `Stream.submit` fills in what it checked: the change applies at `step` on `base` and makes `state`
    (its playback aside), whose steering is `plan` (compiled on the CPU; None without directions)."""

    kind: str
    body: Any
    cause: Cause
    at_step: int | None = None
    order: int = 0  # submission order: changes due at the same step apply in the order they came
    step: int = 0
    base: ControlState | None = None
    state: ControlState | None = None
    plan: SteeringPlan | None = None


@dataclass(frozen=True)
class Applied:
    """A change as it took effect: the state from `step` on."""

    step: int
    version: int
    epoch: int
    state: ControlState
    cause: Cause


def log_line(applied: Applied) -> str:
    """A recording's `state` line for an applied change (docs/protocol.md, "Recordings"), with its newline."""
    return json.dumps({"type": "state", "step": applied.step, "version": applied.version,
                       "state": applied.state.to_dict()}, separators=(",", ":")) + "\n"


class History:
    """The current stream's control states since its step 0, which a recording started mid-stream writes first
    so that its replay regenerates the stream from step 0.

    Bounded two ways. Only the last state of a step is kept: a replay applies a step's states one after another
    before the step runs, so the earlier ones change nothing (10,000 changes between two steps cost one entry).
    And the entries are kept as their log lines, compressed together: consecutive states differ in a field or
    two, so a line costs ~20 bytes rather than the ~750 of a state object. Past `max_bytes` the history is
    dropped and `complete` turns False until the next stream (a recording then needs a new stream)."""

    def __init__(self, max_bytes: int = MAX_HISTORY_BYTES):
        self.max_bytes = max_bytes
        self.clear()

    def clear(self) -> None:
        self._zip = zlib.compressobj()
        self._chunks: list[bytes] = []
        self.nbytes = 0  # compressed bytes held (the compressor's own state is a constant ~300 KB besides)
        self.last: Applied | None = None  # the latest entry, kept as is: a change at the same step replaces it
        self.complete = True
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def append(self, applied: Applied) -> None:
        if self.last is not None and self.last.step == applied.step:
            self.last = applied
            return
        if self.last is not None and self.complete:
            self._chunks.append(self._zip.compress(log_line(self.last).encode()))
            self.nbytes += len(self._chunks[-1])
            if self.nbytes > self.max_bytes:
                self._zip, self._chunks, self.nbytes, self.complete = zlib.compressobj(), [], 0, False
        self.last = applied
        self._count += 1

    def lines(self) -> Iterator[str]:
        """The log lines, oldest first (decompressed a chunk at a time)."""
        if not self.complete:
            return
        unzip = zlib.decompressobj()
        pending = b""
        for chunk in [*self._chunks, self._zip.copy().flush(zlib.Z_SYNC_FLUSH)]:
            pending += unzip.decompress(chunk)
            *whole, pending = pending.split(b"\n")
            for line in whole:
                yield line.decode() + "\n"
        if self.last is not None:
            yield log_line(self.last)


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
        raise ProtocolError(f"at_step must be a whole step number >= 0, got {fields.shown(at_step)}")
    if kind == "set":
        body = {k: v for k, v in message.items() if k not in ("type", "id", "at_step")}
        if not body:
            raise ProtocolError("set: nothing to change")
        return Change("set", body, cause, at_step, order)
    if kind == "transport":
        extra = [k for k in message if k not in ("type", "id", "at_step", "command", "seed")]
        if extra:
            raise ProtocolError(f"transport: unknown field {fields.shown(extra[0])}")
        command = message.get("command")
        if command not in TRANSPORT_COMMANDS:
            raise ProtocolError(f"transport command must be one of {', '.join(TRANSPORT_COMMANDS)}, got "
                                f"{fields.shown(command)}")
        body = {"command": command}
        if "seed" in message:
            seed = message["seed"]
            if command != "reset":
                raise ProtocolError("transport: only reset takes a seed")
            if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
                raise ProtocolError(f"transport seed must be a whole number >= 0, got {fields.shown(seed)}")
            body["seed"] = seed
        return Change("transport", body, cause, at_step, order)
    raise ProtocolError(f"not a control change: {fields.shown(kind)}")


class Stream:
    """Generation for one session; see the module docstring."""

    def __init__(self, model: MusicModel, bank: DirectionBank | None, state: ControlState = ControlState(), *,
                 context_steps: int | None = None, keep_steps: int | None = None, engine: Engine | None = None,
                 decoding: str = "auto"):
        self.model = model
        self.decoding = decoding  # EnCodec streaming (engine.audio.streaming_decoder): a replay uses the log's
        # The engine its generators step on: shared with the other sessions on the device (the server), or, when
        # None, one of each generator's own. Either way a stream's tokens are the same (engine.loop).
        self.engine = engine
        self.bank = bank
        self.site = bank.injection_point if bank is not None else "residual"
        self.known_keys = frozenset(steerable_keys(bank))
        self.context_steps, self.keep_steps = context_steps, keep_steps
        self.hop = int(model.hop_length)
        self.state = replace(state, playback="stopped")
        self.version = 0
        self.epoch = -1  # the first stream is epoch 0
        self.generator: Generator | None = None
        self.decoder: AnyStreamingDecoder | None = None
        self.samples_emitted = 0
        self.history = History()  # the current stream's states since its step 0
        self.finished_codes: torch.Tensor | None = None  # tokens of the last stream that ended
        self._plan: SteeringPlan | None = None  # the current state's plan, on the CPU (as last compiled)
        self._generator_plan: SteeringPlan | None = None  # the CPU plan the generator runs (see _sync_generator)
        self._device_weights: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None  # (CPU weighted, plan tensors on the device)
        self._pending: list[Change] = []  # in the order they will apply: by (step, order)
        self._fresh = 0  # _pending[:_fresh] are checked on what they meet; the others are checked again when needed
        self._front: Change | None = None  # the last change taken from the queue: where the queue goes on from
        self._floor = 0  # the first step a change submitted now can apply at (the next one while a step runs)
        self._order = 0
        # Live sessions pace prompt changes (PROMPT_ENCODE_SHARE); offline runs and replays apply every change at
        # its step (a recording's log holds the steps its changes applied at, paced or not).
        self.pace_prompts = False
        self._prompt_ready = 0  # the first step at which a change to another prompt may apply (pace_prompts)
        self._lock = threading.Lock()  # guards the queue (submit runs on the event loop, steps in a worker)

    # --- inbox --------------------------------------------------------------------------------------

    @property
    def step(self) -> int:
        return self.generator.step if self.generator is not None else 0

    def submit(self, message: dict, cause: Cause) -> Change:
        """Validate a `set` / `transport` message against the state it will meet at its step, and queue it."""
        with self._lock:
            self._order += 1
            change = parse_change(message, cause, self._order)
            at = max(self._floor, change.at_step or 0)
            i = self._slot(at)
            in_order = i == len(self._pending)
            if change.at_step is not None and change.at_step > self.step:
                future = sum(1 for c in self._pending if c.at_step is not None and c.at_step > self.step)
                limit = MAX_FUTURE_CHANGES if in_order else MAX_OUT_OF_ORDER_CHANGES
                if future >= limit:
                    raise ProtocolError(f"too many changes waiting for a future step ({future}; at most {limit}"
                                        f"{'' if in_order else ' when they come out of step order'}); this one "
                                        f"was refused")
            change = self._checked(change, at, *self._before(i))
            self._insert(i, change)
        return change

    def submit_state(self, state: ControlState, at_step: int, cause: Cause) -> None:
        """Queue a whole state (a recording's log line) for `at_step`."""
        with self._lock:
            self._order += 1
            change = Change("state", state, cause, at_step, self._order)
            at = max(self._floor, at_step)
            i = self._slot(at)
            self._insert(i, self._checked(change, at, *self._before(i)))

    def _slot(self, at: int) -> int:
        """Where a change for step `at` goes in the queue: after every change due by then."""
        return bisect.bisect_right([c.step for c in self._pending], at)

    def _before(self, i: int) -> tuple[ControlState, SteeringPlan | None]:
        """The state (and its plan) a change queued at position `i` will meet."""
        self._refresh(i)
        last = self._pending[i - 1] if i else self._front
        if last is not None:
            return last.state, last.plan
        return self.state, self._plan

    def _insert(self, i: int, change: Change) -> None:
        """Queue `change` at `i` (checked on what `_before(i)` gave). One that came out of step order changes what
        the changes after it meet: they are checked again on it, but only once something needs what they make
        (a change queued after them, or their step: `_refresh`), so a knob turned while 64 far-future changes
        wait costs one check, not 65."""
        self._pending.insert(i, change)
        self._fresh = i + 1

    def _refresh(self, n: int) -> None:
        """Check the first `n` queued changes again where what they meet changed since they were checked (see
        `_insert`); one that no longer fits is kept unchecked (it changes nothing in what the next ones meet) and
        is checked once more when it applies, on what it meets then."""
        for j in range(self._fresh, min(n, len(self._pending))):
            last = self._pending[j - 1] if j else self._front
            base, plan = (last.state, last.plan) if last is not None else (self.state, self._plan)
            later = self._pending[j]
            try:
                later = self._checked(later, later.step, base, plan)
            except (ProtocolError, ValueError):
                later = replace(later, base=None, state=base, plan=plan)
            self._pending[j] = later
        self._fresh = max(self._fresh, min(n, len(self._pending)))

    def _checked(self, change: Change, at: int, base: ControlState, base_plan: SteeringPlan | None) -> Change:
        """`change` with what it does at step `at` on `base` (whose plan is `base_plan`); ProtocolError if it
        cannot apply."""
        state = base
        if change.kind == "set":
            state = apply_patch(base, change.body, step=at, known_keys=self.known_keys)
            if self.generator is not None:
                try:
                    self.generator.check_sampling(state.sampling)
                except ValueError as exc:
                    raise ProtocolError(f"{exc} (transport reset)") from None
            if state.directions and self.bank is None:
                raise ProtocolError("this server has no direction bank: start it with --bank FILE")
        elif change.kind == "state":
            state = change.body
        elif "seed" in change.body:  # a reset's seed; playback is the stream's own business
            state = replace(base, seed=change.body["seed"])
        try:  # what only the bank knows (an explicit weighting's length must match its layers); on the CPU, so
            # that checking a message never waits for the model's device
            plan = self._cpu_plan(state, base_plan)
        except ValueError as exc:
            raise ProtocolError(str(exc)) from None
        return replace(change, step=at, base=base, state=state, plan=plan)

    def _cpu_plan(self, state: ControlState, like: SteeringPlan | None) -> SteeringPlan | None:
        """`state`'s steering plan on the CPU: `like` itself when the steering did not change, its weighted
        directions when only coefficients, schedules, the gate, rows or rule did, else compiled."""
        if not state.directions:
            return None
        spec = state.steering if state.steering.site == self.site else replace(state.steering, site=self.site)
        if like is not None and like.spec == spec:
            return like
        if spec.units == "relative" and self.bank.layer_norms is None:
            # A bank made before banks carried their layer norms (the server and replay give them beforehand).
            self.bank = with_layer_norms(self.bank, self.model)
        return SteeringPlan.compile(spec, self.bank, self.model.fingerprint, reuse=like)

    def _on_device(self, plan: SteeringPlan | None) -> SteeringPlan | None:
        """A CPU plan on the model's device; its weighted directions are moved once, not at every knob turn."""
        if plan is None:
            return None
        if self._device_weights is None or self._device_weights[0] is not plan.weighted:
            # A plan's tensors are compiled (or reused) together, so the weighted directions stand for all of them.
            moved = {name: getattr(plan, name).to(device=self.model.device, dtype=self.model.dtype)
                     for name in ("weighted", "quality_tables", "readout") if getattr(plan, name) is not None}
            self._device_weights = (plan.weighted, moved)
        return replace(plan, **self._device_weights[1])

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def _due(self, stepping: bool) -> list[Change]:
        """Pop the changes due at the current step (those without a future `at_step`), in the order they
        came. `stepping`: a step runs next, so a change submitted from now on applies at the step after."""
        with self._lock:
            step = self.step
            waiting = [c.at_step is not None and c.at_step > step for c in self._pending]
            due: list[Change] = []
            if not all(waiting):
                front = self._front
                n = len(waiting) - sum(waiting)
                prefix = not any(waiting[:n])  # (always, but for changes a stop moved: `_meets`)
                self._refresh(n if prefix else len(self._pending))  # what is taken is checked on what it meets
                due = [c for c, wait in zip(self._pending, waiting) if not wait]
                self._pending = [c for c, wait in zip(self._pending, waiting) if wait]
                self._front = due[-1]
                self._fresh = max(0, self._fresh - n) if prefix else 0
                in_queue_order = due
                due = sorted(due, key=lambda c: c.order)
                if stepping and self.pace_prompts and step < self._prompt_ready:
                    due = self._hold_prompt(due, front, prefix and all(a is b for a, b in zip(due, in_queue_order)))
            self._floor = step + 1 if stepping else step
        return due

    def _hold_prompt(self, due: list[Change], front: Change | None, same_order: bool) -> list[Change]:
        """The changes of `due` (in the order they apply) before the first that sets another prompt than the
        generator's; that one and those after it go back to the front of the queue until `_prompt_ready`.
        `same_order`: `due` was the head of the queue in this order, so what was checked still holds."""
        prompt = self.generator.prompt if self.generator is not None else None
        cut = next((k for k, c in enumerate(due) if c.kind == "set" and c.body.get("prompt", prompt) != prompt), None)
        if cut is None:
            return due
        held = due[cut:]
        self._pending = [*held, *self._pending] if same_order else [*sorted(held, key=lambda c: (c.step, c.order)),
                                                                      *self._pending]
        # Held in order, they meet what they were checked on (checked once more when they apply, at another step),
        # not checked again at every step they wait.
        self._fresh = len(held) + self._fresh if same_order else 0
        self._front = due[cut - 1] if cut else front
        return due[:cut]

    def _settle(self) -> None:
        """No step runs next (the stream paused, stopped or restarted): changes apply at the current step."""
        with self._lock:
            self._floor = self.step

    def _meets(self, change: Change, step: int) -> bool:
        """True when `change` applies on the state and at the step it was checked for (its playback aside)."""
        base = change.base
        return change.step == step and base is not None and (
            base is self.state or replace(base, playback=self.state.playback) == self.state)

    # --- applying changes ---------------------------------------------------------------------------

    def apply_due(self) -> StreamChunk:
        """Apply what is due now without stepping; the session calls this while no step is running (stopped
        or paused). The chunk holds the decoder's tail when a stop ended the stream."""
        first_sample, epoch, step = self.samples_emitted, self.epoch, self.step
        applied: list[Applied] = []
        tail: list[np.ndarray] = []
        gen = self.generator
        for change in self._due(stepping=False):
            self._apply(change, applied, tail)
        self._sync_generator(prompt=False)  # (generate() encodes it, before the next step)
        self._settle()
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
        if change.kind == "state" or self._meets(change, step):
            new, plan = change.state, change.plan  # what submit checked
        else:  # it meets another state or step than it was checked for: check it on what it meets
            with self._lock:
                if self._front is change:
                    self._front = None  # the queue goes on from the state this makes, not the one checked
            try:
                checked = self._checked(change, step, self.state, self._plan)
            except ProtocolError:
                return  # it no longer fits what came before it
            new, plan = checked.state, checked.plan
        self.state = replace(new, playback=self.state.playback)
        self._plan = plan  # the generator follows once the step's changes are all applied: _sync_generator
        self._record(change.cause, step, applied)

    def _sync_generator(self, prompt: bool = True) -> None:
        """Give the generator the current state's prompt, sampling and plan, once all the changes due at a step
        have applied: of 50 prompts due at one step only the last is encoded (encoding is the costly part).
        `prompt` False (no step runs next): the prompt waits for the next step, so that the prompts set while a
        stream is paused, or held for want of listeners, are encoded once, the last of them."""
        gen = self.generator
        if gen is None:
            return
        if prompt and gen.prompt != self.state.prompt:
            started = time.perf_counter()
            gen.set_prompt(self.state.prompt)
            if self.pace_prompts:
                wait = max(PROMPT_MIN_SECONDS, (time.perf_counter() - started) / PROMPT_ENCODE_SHARE)
                self._prompt_ready = gen.step + math.ceil(wait * self.model.frame_rate)
        if gen.sampling != self.state.sampling:
            gen.set_sampling(self.state.sampling)
        if self._generator_plan is not self._plan:
            gen.plan = self._on_device(self._plan)
            self._generator_plan = self._plan

    def _start_stream(self) -> None:
        s = self.state
        self.epoch += 1
        self._plan = self._cpu_plan(s, self._plan)  # the state may have been set directly (a replay's first)
        self.generator = Generator(self.model, s.prompt, sampling=s.sampling, seed=s.seed,
                                   plan=self._on_device(self._plan), context_steps=self.context_steps,
                                   keep_steps=self.keep_steps, engine=self.engine)
        self._generator_plan = self._plan
        self.decoder = streaming_decoder(self.model.hf.audio_encoder, self.decoding,
                                         stacks=self.generator.engine.codec_stacks)
        self.samples_emitted = 0
        self.history.clear()
        self._prompt_ready = 0

    def _end_stream(self) -> np.ndarray:
        tail = self.decoder.flush().reshape(-1).float().cpu().numpy()
        self.samples_emitted += tail.shape[0]
        self.finished_codes = self.generator.codes()  # the ended stream's tokens, for its recording
        self.generator.close()
        self.generator = self.decoder = None
        self.state = replace(self.state, playback="stopped")
        return tail

    # --- generating ---------------------------------------------------------------------------------

    def generate(self, max_steps: int) -> StreamChunk:
        """Run up to `max_steps` steps while playing, applying due changes before each step, and decode the
        frames they complete. Returns early when a change pauses or ends the stream at its step."""
        return generate_together([self], max_steps)[0]

    def close(self) -> None:
        """Give the engine back this stream's slot (the session is going away)."""
        if self.generator is not None:
            self.generator.close()

    def _decode(self, codes: list[torch.Tensor], audio: list[np.ndarray]) -> None:
        _decode_together([(self, codes, audio)])


class _Share:
    """One stream's part of a chunk that several streams generate together."""

    def __init__(self, stream: Stream):
        self.stream = stream
        self.first_sample, self.epoch, self.start = stream.samples_emitted, stream.epoch, stream.step
        self.applied: list[Applied] = []
        self.audio: list[np.ndarray] = []
        self.codes: list[torch.Tensor] = []
        self.ended = False
        self.done = False  # paused or ended: no more steps in this chunk
        self.ran = 0

    def before_step(self, i: int) -> bool:
        """Apply the changes due before step i of the chunk; False when the stream does not step (any more)."""
        s = self.stream
        due = s._due(stepping=True)
        gen = s.generator
        if due:
            s._decode(self.codes, self.audio)  # frames so far go out before a change can end the stream
            for change in due:
                s._apply(change, self.applied, self.audio)
        if due or i == 0:  # (the first step also takes a prompt set while no step ran: apply_due)
            s._sync_generator()
            self.ended = gen is not None and s.generator is not gen
        if self.ended or s.state.playback != "playing":
            s._settle()
            self.done = True
        return not self.done

    def chunk(self, seconds: float) -> StreamChunk:
        s = self.stream
        out = np.concatenate(self.audio).astype(np.float32) if self.audio else np.zeros(0, np.float32)
        return StreamChunk(out, self.first_sample, (self.start, self.start + self.ran), s.version, self.epoch,
                           self.applied, self.ended, seconds)


@torch.no_grad()
def generate_together(streams: list[Stream], max_steps: int) -> list[StreamChunk]:
    """`Stream.generate` for several streams at once: each step, the streams that are playing apply their due
    changes, then advance in one batched forward per engine (engine.loop.Engine.step; streams on one engine get
    the tokens they would get alone), and their frames decode together at the end. Each chunk's `seconds` is
    the wall-clock time of the whole call: what the stream waited for its audio."""
    started = time.perf_counter()
    shares = [_Share(s) for s in streams]
    for i in range(max_steps):
        stepping = [sh for sh in shares if not sh.done and sh.before_step(i)]
        if not stepping:
            break
        engines: dict[int, list[_Share]] = {}
        for sh in stepping:
            engines.setdefault(id(sh.stream.generator.engine), []).append(sh)
        for group in engines.values():
            group[0].stream.generator.engine.step([sh.stream.generator for sh in group])
        for sh in stepping:
            sh.codes.append(sh.stream.generator.take_chunk(sh.stream.step - 1).codes)
            sh.ran += 1
    _decode_together([(sh.stream, sh.codes, sh.audio) for sh in shares])
    seconds = time.perf_counter() - started
    return [sh.chunk(seconds) for sh in shares]


def _decode_together(work: list[tuple[Stream, list[torch.Tensor], list[np.ndarray]]]) -> None:
    """Decode each stream's pending frames (`codes`, emptied) and append the audio to its `audio`."""
    work = [(s, codes, audio) for s, codes, audio in work if codes]
    if not work:
        return
    pcms = push_together([s.decoder for s, _, _ in work], [torch.cat(codes, dim=1) for _, codes, _ in work])
    for (s, codes, audio), pcm in zip(work, pcms):
        pcm = pcm.reshape(-1).float().cpu().numpy()
        s.samples_emitted += pcm.shape[0]
        audio.append(pcm)
        codes.clear()
