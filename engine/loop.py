"""The decode loop: one MusicGen step at a time, steered, paused between steps, endless if asked.

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
`plan.at(steps)`: the plan's per-layer vectors for that step. A re-prompt refill is steered with the coefficients of the steps at
which those positions were first generated, under the plan current at the time of the refill.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from musicrfm.protocol.wire import end_step

from .decoder import MusicgenDecoder, TextConditioning, delayed_inputs, frame_at
from .model import MusicModel
from .sampling import SamplingConfig, guided_logits, sample_tokens
from .steering import SteeringPlan


# Prompts whose text-encoder output a generator keeps: a live session switching between a few prompts encodes
# each once (an encoding is [rows, tokens, d_model]: up to ~8 MB for musicgen-large's longest prompts).
PROMPT_CACHE = 8


@dataclass(frozen=True)
class Chunk:
    """Frames completed by a run of steps."""

    codes: torch.Tensor  # [K, n] int64 on CPU
    first_frame: int  # global index of codes[:, 0]
    steps: tuple[int, int]  # generation steps [start, end) that ran for this chunk

    @property
    def num_frames(self) -> int:
        return int(self.codes.shape[1])


class Generator:
    """Steps a MusicGen decoder for one stream. Drive it with `run(steps)` or `chunk(steps)`."""

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
    ):
        self.model = model
        self.num_codebooks = k = model.num_codebooks
        positions = int(model.decoder_config.max_position_embeddings)
        self.context_steps = context_steps or min(positions, round(30 * model.frame_rate))
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
        self._guidance = sampling.uses_guidance
        self.decoder = MusicgenDecoder(model, rows=2 if self._guidance else 1, capacity=self.context_steps)
        self._encoded: dict[str, TextConditioning] = {}  # prompt -> its encoding, least recently used first
        self.set_prompt(prompt)

        self._codes = torch.full((k, 1024), model.pad_token_id, dtype=torch.long, device=model.device)
        self._known = [0] * k  # frames known per codebook (prompt or generated), contiguous from 0
        self.step = 0  # next generation step = next global position to feed
        self._offset = 0  # global position held at cache slot 0
        self._emitted = 0  # frames already returned by chunk()
        if audio_prompt is not None:
            self._set_audio_prompt(audio_prompt)

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
        self.decoder.set_conditioning(cond)

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

    def _reprompt(self) -> None:
        self._offset = self.step - self.keep_steps
        self.decoder.reset()

    @torch.no_grad()
    def advance(self) -> None:
        """One generation step: feed position `step` (after a re-prompt, the whole refill), predict the
        next position, keep the tokens the delay pattern leaves free."""
        if self.finished:
            raise RuntimeError("generation finished: all total_frames are complete")
        if self.step - self._offset >= self.context_steps:
            self._reprompt()
        first = self._offset + self.decoder.length
        plan = self.plan  # read once: a swap by another thread applies from the next step
        steering = plan.at(range(first, self.step + 1)) if plan is not None else None  # None: nothing to add
        logits = self.decoder.forward(self._inputs(first, self.step), steering)
        tokens = sample_tokens(guided_logits(logits, self.sampling, 1), self.sampling, self.rng)[0]  # [K]

        predicted = self.step + 1
        self._ensure_capacity(predicted)
        for k in range(self.num_codebooks):
            frame = frame_at(predicted, k)
            if frame < self._known[k] or (self.total_frames is not None and frame >= self.total_frames):
                continue  # before the first frame (BOS), given by the prompt, or past the end (padding)
            self._codes[k, frame] = tokens[k]
            self._known[k] = frame + 1
        self.step += 1

    def run(self, steps: int) -> None:
        for _ in range(steps):
            if self.finished:
                return
            self.advance()

    def chunk(self, steps: int) -> Chunk:
        """Run up to `steps` steps and return the frames they completed (possibly none)."""
        start = self.step
        self.run(steps)
        first, end = self._emitted, self.frames_complete
        self._emitted = end
        return Chunk(codes=self.codes(first, end), first_frame=first, steps=(start, self.step))

    def steps_for_frames(self, frames: int) -> int:
        """Steps still needed until `frames` frames are complete."""
        return max(0, end_step(frames, self.num_codebooks) - self.step)
