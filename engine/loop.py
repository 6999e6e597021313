"""The decode loop: MusicGen steps, steered, paused between steps, endless if asked; one stream or many at once.

Streams and the engine. A `Generator` is one stream: its tokens, its position, its sampling settings and RNG,
its steering plan, its prompt. An `Engine` owns one decoder on one device and steps any number of streams
together: `Engine.step(generators)` feeds each of them one position in ONE batched forward (each stream its
own rows of the decoder's cache, its own conditioning, position, steering), then samples each with its own
settings and RNG. A generator made without an engine gets one of its own, so stepping alone and stepping in
company are the same code, and a stream's tokens are the same either way: the batched step's shapes do not
depend on the other streams (static cache and text shapes, rows padded to a power of two >= MIN_ROWS), and
feeding several positions at once (a re-prompt refill, an audio prompt) runs for that stream alone. That is
tested bit for bit on the CPU. On a GPU the libraries choose matrix-product kernels by shape, and a batch of
another size may round differently in the last bits (and so, rarely, sample another token): there, a stream
made in company and made alone are alike, not identical, until it is measured otherwise.

Positions and steps. MusicGen predicts K codebooks per position with the delay pattern: position p
carries codebook k of frame `decoder.frame_at(p, k)` = p - k - 1 (BOS where that is negative), so frame f
is complete once position f + K has been predicted (`protocol.wire.end_step`: the step a stream of F frames
ends at). Generation step s feeds position s and predicts position s + 1, in
one global count that never resets: it is the clock of steering schedules and gates (50 steps = 1 s),
and it is what `Chunk.steps` reports.

Context. The decoder's cache holds `context_steps` positions (30 s for the released models). When it
is full the loop re-prompts, as audiocraft does for long audio: the cache is refilled in one forward
pass with the last `keep_steps` positions (same global positions, same tokens, BOS for the codebooks
whose frames fall before the new window), and generation goes on from the same step. No token is
dropped or regenerated, so the audio has no gap; the new window simply sees less of the past.

Steering. Each step reads `self.plan` once (the server swaps it between steps) and hands the decoder
`plan.at(steps)`: the plan's per-layer vectors for that step, stacked with the other streams' by
`BatchSteering`. A re-prompt refill is steered with the coefficients of the steps at
which those positions were first generated, under the plan current at the time of the refill.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from musicrfm.protocol.wire import end_step

from .audio import CapturedStacks
from .decoder import MusicgenDecoder, TextConditioning, delayed_inputs, frame_at
from .model import MusicModel
from .sampling import SamplingConfig, guided_logits, sample_tokens
from .steering import BatchSteering, SteeringPlan

# Prompts whose text-encoder output a generator keeps: a live session switching between a few prompts encodes
# each once (an encoding is [rows, tokens, d_model]: up to ~8 MB for musicgen-large's longest prompts).
PROMPT_CACHE = 8
# The fewest rows a batched step computes. On the CPU a matrix product over fewer than 4 rows takes another
# kernel that rounds differently (measured: tests/engine/test_batched.py), so a stream stepping alone would not
# get the numbers it gets in company. Padding one stream's 2 rows to 4 costs it ~40 % on a 2-core CPU (nothing
# on a GPU), so a render that will never have company (`generate`) may ask for min_rows=1.
MIN_ROWS = 4
# Text tokens of a prompt the cross-attention reads: every stream holds this many keys (shorter prompts are
# masked), so that its numbers do not depend on another stream's prompt. MusicGen's captions are ~10-40 tokens.
MAX_TEXT_TOKENS = 256


def padded_rows(rows: int, minimum: int = MIN_ROWS) -> int:
    """Rows a batched step computes when `rows` are in use: a power of two, at least `minimum` (a few static
    shapes, each of which a CUDA graph can capture)."""
    n = minimum
    while n < rows:
        n *= 2
    return n


def text_tokens_for(model: MusicModel) -> int:
    """The prompt tokens an engine reads: the tokenizer's own limit, at most MAX_TEXT_TOKENS."""
    limit = getattr(model.tokenizer, "model_max_length", MAX_TEXT_TOKENS)
    return int(min(limit, MAX_TEXT_TOKENS)) if isinstance(limit, int) and limit > 0 else MAX_TEXT_TOKENS


def default_context_steps(model: MusicModel) -> int:
    """30 s of context (the released models' training length), or the model's positions if fewer."""
    return min(int(model.decoder_config.max_position_embeddings), round(30 * model.frame_rate))


@dataclass(frozen=True)
class Chunk:
    """Frames completed by a run of steps."""

    codes: torch.Tensor  # [K, n] int64 on CPU
    first_frame: int  # global index of codes[:, 0]
    steps: tuple[int, int]  # generation steps [start, end) that ran for this chunk

    @property
    def num_frames(self) -> int:
        return int(self.codes.shape[1])


class Engine:
    """One MusicGen decoder on one device, stepping any number of streams together (module docstring).

    Each attached generator holds a slot: `rows_per_slot` rows of the decoder (conditional, then unconditional
    when the engine carries guidance rows). Slots stay packed at [0, n): when a stream leaves, the last one
    moves into its place, so a step computes `padded_rows(n * rows_per_slot)` rows whatever the history.
    `min_rows` 1: no padding, for a stream that steps alone for good (MIN_ROWS)."""

    def __init__(self, model: MusicModel, *, context_steps: int | None = None, guidance: bool = True,
                 slots: int = 1, text_tokens: int | None = None, min_rows: int = MIN_ROWS,
                 capture: bool = False, site: str = "residual"):
        """`capture`: replay the batched step captured once per row count (engine.graphs: a CUDA graph on a GPU, a
        TorchScript trace on a CPU; steering captured at `site`, the bank's injection point), and offer the streams
        traced EnCodec stacks (`codec_stacks`, engine.audio.CapturedStacks); if capturing fails, the engine steps
        (or decodes) eagerly and says why."""
        self.model = model
        self.min_rows = min_rows
        self.context_steps = context_steps or default_context_steps(model)
        self.rows_per_slot = 2 if guidance else 1
        self.text_tokens = text_tokens or text_tokens_for(model)
        self.decoder = MusicgenDecoder(model, rows=self.padded(max(1, slots) * self.rows_per_slot),
                                       capacity=self.context_steps, text_tokens=self.text_tokens)
        self.streams: list[Generator] = []  # by slot
        self.captured = None  # engine.graphs.CapturedSteps when asked to capture
        # The exact EnCodec decoder's stacks traced likewise, for the streams of this engine that take them.
        self.codec_stacks: CapturedStacks | None = None
        if capture:
            from .graphs import CapturedSteps

            self.captured = CapturedSteps(self.decoder, site)
            self.codec_stacks = CapturedStacks()

    def padded(self, rows: int) -> int:
        return padded_rows(rows, self.min_rows)

    @property
    def guidance(self) -> bool:
        return self.rows_per_slot == 2

    def attach(self, gen: "Generator") -> int:
        """A slot for `gen` (called by Generator)."""
        self.streams.append(gen)
        self.decoder.grow(self.padded(len(self.streams) * self.rows_per_slot))
        return len(self.streams) - 1

    def detach(self, gen: "Generator") -> None:
        """Free `gen`'s slot; the last stream moves into it (its cache, conditioning and length with it)."""
        slot = self.streams.index(gen)
        last = self.streams.pop()
        if last is not gen:
            self.decoder.move_rows(self.slot_rows(last.slot), self.slot_rows(slot))
            last.slot = slot
            self.streams[slot] = last

    def slot_rows(self, slot: int, count: int | None = None) -> slice:
        """The decoder rows of `slot` (its first `count`: the conditional row alone is 1)."""
        start = slot * self.rows_per_slot
        return slice(start, start + (count or self.rows_per_slot))

    @torch.no_grad()
    def step(self, generators: Sequence["Generator"]) -> None:
        """One generation step for each of `generators` (all attached here). Those that feed one position go
        through one batched forward; one that feeds several (a refill after re-prompting, an audio prompt)
        runs alone first."""
        for gen in generators:
            if gen.engine is not self or gen.slot is None:
                raise ValueError("a generator stepped by an engine must be attached to it")
            gen._prepare()
        logits: dict[int, torch.Tensor] = {}
        batched = []
        for gen in generators:
            if gen._feed_start() < gen.step:
                logits[id(gen)] = gen._feed_alone()
            else:
                batched.append(gen)
        if batched:
            m = self.padded(len(self.streams) * self.rows_per_slot)
            tokens = torch.full((m, self.model.num_codebooks, 1), self.model.pad_token_id, dtype=torch.long,
                                device=self.model.device)
            stepping = [False] * m
            steered = []
            for gen in batched:
                rows = gen.rows
                tokens[rows] = gen._inputs(gen.step, gen.step)
                stepping[rows] = [True] * (rows.stop - rows.start)
                plan = gen.plan  # read once: a swap by another thread applies from the next step
                steering = plan.at([gen.step]) if plan is not None else None
                if steering is not None:
                    steered.append((gen.rows if steering.rows == "both" else self.slot_rows(gen.slot, 1), steering))
            step = self.captured or self.decoder.step
            out = step(tokens, stepping, BatchSteering.stack(m, steered))
            for gen in batched:
                logits[id(gen)] = out[gen.rows]
        # Streams with the same sampling settings choose their tokens together (row by row, each with its own RNG).
        alike: dict[tuple[SamplingConfig, int], list[Generator]] = {}
        for gen in generators:
            alike.setdefault((gen.sampling, gen.rows.stop - gen.rows.start), []).append(gen)
        for (sampling, _), group in alike.items():
            guided = guided_logits(torch.stack([logits[id(g)] for g in group], dim=1).flatten(0, 1), sampling,
                                   len(group))
            for gen, chosen in zip(group, sample_tokens(guided, sampling, [g.rng for g in group])):
                gen._take(chosen)


class Generator:
    """Steps a MusicGen decoder for one stream. Drive it with `run(steps)` or `chunk(steps)` alone, or with
    `Engine.step` together with other streams on the same engine (`engine=`)."""

    def __init__(
        self,
        model: MusicModel,
        prompt: str = "",
        *,
        sampling: SamplingConfig = SamplingConfig(),
        seed: int = 0,
        plan: SteeringPlan | None = None,
        context_steps: int | None = None,
        keep_steps: int | None = None,
        total_frames: int | None = None,
        audio_prompt: torch.Tensor | None = None,
        engine: Engine | None = None,
    ):
        self.model = model
        self.num_codebooks = k = model.num_codebooks
        self._guidance = sampling.uses_guidance
        if engine is None:
            engine = Engine(model, context_steps=context_steps, guidance=self._guidance)
        elif context_steps is not None and context_steps != engine.context_steps:
            raise ValueError(f"context_steps {context_steps} differs from the engine's {engine.context_steps}")
        if self._guidance and not engine.guidance:
            raise ValueError("this engine has no unconditional rows: guidance needs an engine made with guidance")
        if engine.model is not model:
            raise ValueError("the engine runs another model")
        self.context_steps = engine.context_steps
        # Keep 20 s of a 30 s window (audiocraft's choice); small models keep two thirds of theirs.
        default_keep = min(round(20 * model.frame_rate), 2 * self.context_steps // 3)
        self.keep_steps = keep_steps if keep_steps is not None else default_keep
        if not 0 <= self.keep_steps < self.context_steps - 1:
            raise ValueError(f"keep_steps ({self.keep_steps}) must be in [0, context_steps - 1 = "
                             f"{self.context_steps - 1})")
        if total_frames is not None and total_frames < 1:
            raise ValueError(f"total_frames must be >= 1, got {total_frames}")
        self.total_frames = total_frames
        self.sampling = sampling
        self.plan = plan
        self.seed = seed
        self.rng = torch.Generator(device=model.device).manual_seed(seed)
        self.engine = engine
        self.slot: int | None = engine.attach(self)
        self._encoded: dict[str, TextConditioning] = {}  # prompt -> its encoding, least recently used first
        self.decoder.reset(self.rows)
        try:
            self.set_prompt(prompt)
        except Exception:
            self.close()
            raise

        self._codes = torch.full((k, 1024), model.pad_token_id, dtype=torch.long, device=model.device)
        self._known = [0] * k  # frames known per codebook (prompt or generated), contiguous from 0
        self.step = 0  # next generation step = next global position to feed
        self._offset = 0  # global position held at cache slot 0
        self._emitted = 0  # frames already returned by chunk()
        if audio_prompt is not None:
            self._set_audio_prompt(audio_prompt)

    @property
    def decoder(self) -> MusicgenDecoder:
        return self.engine.decoder

    @property
    def rows(self) -> slice:
        """This stream's rows of the decoder: the conditional one, and the unconditional one under guidance."""
        if self.slot is None:
            raise RuntimeError("this generator was closed")
        return self.engine.slot_rows(self.slot, 2 if self._guidance else 1)

    def close(self) -> None:
        """Give the engine its slot back (a stream that ended); the generator cannot step any more."""
        if self.slot is not None:
            self.engine.detach(self)
            self.slot = None

    # --- live controls ------------------------------------------------------------------------------

    def set_prompt(self, prompt: str) -> None:
        """Takes effect at the next step; the audio context is kept, so there is no gap. The text encoder's
        output for the last PROMPT_CACHE prompts is kept: going back to one of them encodes nothing."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
        cond = self._encoded.pop(prompt, None)
        if cond is None:
            cond = self.decoder.encode_text([prompt], guidance=self._guidance)
        self._encoded[prompt] = cond  # the most recent last
        while len(self._encoded) > PROMPT_CACHE:
            del self._encoded[next(iter(self._encoded))]
        self.prompt = prompt
        self.decoder.set_conditioning(cond, self.rows)

    def check_sampling(self, sampling: SamplingConfig) -> None:
        """Raise ValueError if this stream cannot switch to `sampling` (a stream started without guidance has
        no unconditional row to guide with)."""
        if sampling.uses_guidance and not self._guidance:
            raise ValueError("this stream was started without guidance (scale 1): start a new stream to use it")

    def set_sampling(self, sampling: SamplingConfig) -> None:
        self.check_sampling(sampling)
        self.sampling = sampling

    # --- state --------------------------------------------------------------------------------------

    @property
    def frames_complete(self) -> int:
        n = min(self._known)
        return n if self.total_frames is None else min(n, self.total_frames)

    @property
    def finished(self) -> bool:
        return self.total_frames is not None and self.frames_complete >= self.total_frames

    def codes(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Completed frames [K, end - start] on CPU."""
        end = self.frames_complete if end is None else end
        return self._codes[:, start:end].cpu()

    def _set_audio_prompt(self, codes: torch.Tensor) -> None:
        if codes.dim() != 2 or codes.shape[0] != self.num_codebooks or codes.dtype != torch.long:
            raise ValueError(f"audio prompt must be int64 codes [{self.num_codebooks}, frames], got "
                             f"{tuple(codes.shape)} {codes.dtype}")
        vocab = int(self.model.decoder_config.vocab_size)
        if codes.numel() and (codes.min() < 0 or codes.max() >= vocab):
            raise ValueError(f"audio prompt codes must lie in [0, {vocab})")
        n = codes.shape[1]
        if n + 1 >= self.context_steps:
            raise ValueError(f"audio prompt of {n} frames does not fit a context of {self.context_steps} steps")
        self._ensure_capacity(n)
        self._codes[:, :n] = codes.to(self._codes.device)
        self._known = [n] * self.num_codebooks
        self._emitted = n
        self.step = n  # positions 0..n are all known: the first step feeds them in one pass

    def _ensure_capacity(self, frames: int) -> None:
        if frames > self._codes.shape[1]:
            grow = torch.full_like(self._codes, self.model.pad_token_id)
            self._codes = torch.cat([self._codes, grow], dim=1)
            self._ensure_capacity(frames)

    # --- the loop -----------------------------------------------------------------------------------

    def _inputs(self, first: int, last: int) -> torch.Tensor:
        """Input tokens [1, K, T] for global positions first..last under the current window."""
        return delayed_inputs(self._codes[None], first, last, self.model.pad_token_id,
                              window_start=self._offset, end=self.total_frames)

    def _prepare(self) -> None:
        """Before a step: refuse a finished stream; re-prompt when the context is full."""
        if self.finished:
            raise RuntimeError("generation finished: all total_frames are complete")
        if self.step - self._offset >= self.context_steps:
            self._offset = self.step - self.keep_steps
            self.decoder.reset(self.rows)

    def _feed_start(self) -> int:
        """The first global position this step feeds (`step` itself, unless the cache must be refilled)."""
        return self._offset + self.decoder.lengths[self.rows.start]

    def _feed_alone(self) -> torch.Tensor:
        """Feed positions _feed_start()..step in one pass of this stream's rows alone; logits [R, K, V]."""
        first = self._feed_start()
        plan = self.plan
        steering = plan.at(range(first, self.step + 1)) if plan is not None else None
        return self.decoder.forward(self._inputs(first, self.step), steering, rows=self.rows, cond_rows=1)

    def _take(self, tokens: torch.Tensor) -> None:
        """Keep the step's tokens [K] that the delay pattern leaves free."""
        predicted = self.step + 1
        self._ensure_capacity(predicted)
        for k in range(self.num_codebooks):
            frame = frame_at(predicted, k)
            if frame < self._known[k] or (self.total_frames is not None and frame >= self.total_frames):
                continue  # before the first frame (BOS), given by the prompt, or past the end (padding)
            self._codes[k, frame] = tokens[k]
            self._known[k] = frame + 1
        self.step += 1

    def advance(self) -> None:
        """One generation step of this stream alone: feed position `step` (after a re-prompt, the whole refill),
        predict the next position, keep the tokens the delay pattern leaves free."""
        self.engine.step([self])

    def run(self, steps: int) -> None:
        for _ in range(steps):
            if self.finished:
                return
            self.advance()

    def take_chunk(self, start_step: int) -> Chunk:
        """The frames completed since the last chunk was taken (steps from `start_step` to now)."""
        first, end = self._emitted, self.frames_complete
        self._emitted = end
        return Chunk(codes=self.codes(first, end), first_frame=first, steps=(start_step, self.step))

    def chunk(self, steps: int) -> Chunk:
        """Run up to `steps` steps and return the frames they completed (possibly none)."""
        start = self.step
        self.run(steps)
        return self.take_chunk(start)

    def steps_for_frames(self, frames: int) -> int:
        """Steps still needed until `frames` frames are complete."""
        return max(0, end_step(frames, self.num_codebooks) - self.step)
