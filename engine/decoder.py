"""MusicGen's decoder, forward pass written out over the transformers weights, with a static KV cache.

Why not call the transformers modules step by step: the decode loop needs (a) a preallocated cache it
owns (no per-step allocation, cheap to reset when re-prompting), (b) steering applied inline at one
well-defined point instead of forward hooks (the reference code's hook silently steered batch row 0
only), and (c) the same code path for feature extraction, so probes read features exactly where the
engine later adds directions. The arithmetic is the transformers implementation's, op for op; a test
checks that greedy decoding gives the tokens `generate` gives.

Two ways through the same layers:
- `forward` feeds T positions to a group of rows that share one cache length: feature extraction, an audio
  prompt, a re-prompt refill. Batch layout under classifier-free guidance: rows [0, B) conditional, rows
  [B, 2B) unconditional (zero text states, as transformers and audiocraft do).
- `step` feeds ONE position to each of rows [0, M), every row at its own cache length: the batched decode
  step that advances many streams together (engine.loop.Engine). Its shapes are static (attention over the
  whole cache capacity, cross-attention over `text_tokens` keys, M from a few buckets), so a row's result
  does not depend on what the other rows hold or how long their caches are, and the step can be captured
  once and replayed (a CUDA graph, a TorchScript trace: engine.graphs).

INJECTION POINTS (`INJECTION_POINTS`, the one definition: banks and steering specs import it; probes/ reads
features at "residual"):
- "residual":  the residual stream at the output of decoder block l (after its feed-forward residual
               add, before the next block; for the last block, before the final LayerNorm).
- "attention": the output of block l's self-attention (after out_proj, before the residual add).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch
import torch.nn.functional as F

from .model import MusicModel

log = logging.getLogger("musicrfm.decoder")

INJECTION_POINTS = ("residual", "attention")


def frame_at(position: int | torch.Tensor, codebook: int | torch.Tensor) -> int | torch.Tensor:
    """MusicGen's delay pattern: position p carries codebook k of frame p - k - 1 (the BOS/pad id where that
    is negative). For ints, or tensors that broadcast. protocol.wire.end_step is the same relation seen from
    the client: the step at which a stream's last frame is complete."""
    return position - codebook - 1


def delayed_inputs(codes: torch.Tensor, first: int, last: int, pad_id: int, window_start: int = 0,
                   end: int | None = None) -> torch.Tensor:
    """The decoder's input tokens for positions first..last under MusicGen's delay pattern.

    codes [B, K, F] holds frames by index; position p carries codebook k of frame p - k - 1. A frame
    before `window_start` (the first frame of the current context) or at/after `end` (past a finite
    stream's end) reads as the BOS/pad id, exactly as in generation. Returns [B, K, last - first + 1]."""
    b, k, _ = codes.shape
    dev = codes.device
    pos = torch.arange(first, last + 1, device=dev)
    frame = frame_at(pos[None, :], torch.arange(k, device=dev)[:, None])  # [K, T]
    valid = frame >= window_start
    if end is not None:
        valid &= frame < end
    tokens = codes.gather(2, frame.clamp(min=0).expand(b, k, -1))
    return torch.where(valid, tokens, pad_id)


class LayerSteering(Protocol):
    """What `forward` needs from steering: which site, which rows, and the steered hidden states of a layer."""

    site: str
    rows: str  # "both" or "cond"

    def steer(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """h [R, T, d] at the site of `layer` (the rows steered) -> the steered hidden states."""


class RowSteering(Protocol):
    """What `step` needs from steering: each row's own vectors (zeros for a row not steered)."""

    def steer(self, site: str, layer: int, h: torch.Tensor) -> torch.Tensor:
        """h [M, 1, d] at injection point `site` of `layer` -> the steered hidden states."""


@dataclass
class TextConditioning:
    """Projected text-encoder states for the cross-attention, already in CFG row layout."""

    states: torch.Tensor  # [R, S, d_model], R = B (no guidance) or 2B (cond rows, then uncond rows)
    mask: torch.Tensor  # [R, S] bool, True = attend

    @property
    def tokens(self) -> int:
        return int(self.states.shape[1])


class MusicgenDecoder:
    """Forward pass over a loaded MusicGen's decoder weights with a cache of fixed capacity per row.

    `text_tokens`: the cross-attention keys every row holds (shorter prompts are padded and masked); None
    takes the first conditioning's length."""

    def __init__(self, model: MusicModel, rows: int, capacity: int, text_tokens: int | None = None):
        dec = model.hf.decoder.model.decoder
        self.model = model
        self.embed_tokens = dec.embed_tokens
        self.positions = dec.embed_positions
        self.layers = dec.layers
        self.final_norm = dec.layer_norm
        self.lm_heads = model.hf.decoder.lm_heads
        self.capacity = capacity
        self.text_tokens = text_tokens
        cfg = model.decoder_config
        self.num_heads = int(cfg.num_attention_heads)
        self.head_dim = int(cfg.hidden_size) // self.num_heads
        if capacity > self.positions.weights.shape[0]:
            raise ValueError(
                f"context of {capacity} steps exceeds the model's {self.positions.weights.shape[0]} positions"
            )
        self.rows = 0
        # One position past the capacity: where `step` writes the keys of rows that do not step this time.
        empty = (0, self.num_heads, capacity + 1, self.head_dim)
        kw = dict(device=model.device, dtype=model.dtype)
        self.k_cache = [torch.zeros(empty, **kw) for _ in self.layers]
        self.v_cache = [torch.zeros(empty, **kw) for _ in self.layers]
        self.cross_k: list[torch.Tensor] = []
        self.cross_v: list[torch.Tensor] = []
        self.cross_bias: torch.Tensor | None = None  # [rows, 1, 1, text_tokens] additive
        self.lengths: list[int] = []  # positions held in each row's cache
        self.grow(rows)

    # --- rows ---------------------------------------------------------------------------------------

    def grow(self, rows: int) -> None:
        """Hold at least `rows` rows (the caches are reallocated and copied: rare, when streams join)."""
        if rows <= self.rows:
            return

        def bigger(old: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
            new = torch.full((rows, *old.shape[1:]), fill, dtype=old.dtype, device=old.device)
            new[: old.shape[0]] = old
            return new

        self.k_cache = [bigger(c) for c in self.k_cache]
        self.v_cache = [bigger(c) for c in self.v_cache]
        self.cross_k = [bigger(c) for c in self.cross_k]
        self.cross_v = [bigger(c) for c in self.cross_v]
        if self.cross_bias is not None:
            self.cross_bias = bigger(self.cross_bias, torch.finfo(self.cross_bias.dtype).min)
        self.lengths += [0] * (rows - self.rows)
        self.rows = rows

    def state(self) -> list[torch.Tensor]:
        """The tensors a step reads and writes besides its inputs, in a fixed order: the caches, the cross-attention
        keys and values, their mask (engine.graphs hands them to a traced step)."""
        if self.cross_bias is None:
            raise RuntimeError("set_conditioning() must be called before the decoder has a state")
        return [*self.k_cache, *self.v_cache, *self.cross_k, *self.cross_v, self.cross_bias]

    def set_state(self, tensors: Sequence[torch.Tensor]) -> None:
        """Read and write `tensors` (in `state()`'s order) from now on."""
        n = len(self.layers)
        if len(tensors) != 4 * n + 1:
            raise ValueError(f"a decoder state is {4 * n + 1} tensors, got {len(tensors)}")
        self.k_cache, self.v_cache, self.cross_k, self.cross_v = (list(tensors[i * n:(i + 1) * n]) for i in range(4))
        self.cross_bias = tensors[4 * n]

    def _indices(self, rows: slice | None) -> tuple[slice, range]:
        """`rows` (None: all of them) and the row numbers it covers."""
        rows = rows if rows is not None else slice(0, self.rows)
        return rows, range(*rows.indices(self.rows))

    def move_rows(self, src: slice, dst: slice) -> None:
        """Copy rows `src` (caches, conditioning, lengths) onto rows `dst`: the engine keeps streams packed."""
        for caches in (self.k_cache, self.v_cache, self.cross_k, self.cross_v):
            for c in caches:
                c[dst] = c[src]
        if self.cross_bias is not None:
            self.cross_bias[dst] = self.cross_bias[src]
        self.lengths[dst] = self.lengths[src]

    # --- conditioning -------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_text(self, prompts: list[str], guidance: bool) -> TextConditioning:
        """T5-encode prompts once; with guidance, append the unconditional rows (zero states, masked). With
        `text_tokens` set, a longer prompt is cut to that many tokens (the tokenizer's own truncation)."""
        m = self.model
        batch = m.tokenizer(prompts, return_tensors="pt", padding=True)
        if self.text_tokens and batch["input_ids"].shape[1] > self.text_tokens:
            log.warning("prompt of %d text tokens: the model reads its first %d", batch["input_ids"].shape[1],
                        self.text_tokens)
            batch = m.tokenizer(prompts, return_tensors="pt", padding=True, truncation=True, max_length=self.text_tokens)
        ids = batch["input_ids"].to(m.device)
        mask = batch["attention_mask"].to(m.device)
        states = m.hf.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        proj = getattr(m.hf, "enc_to_dec_proj", None)
        if proj is not None:
            states = proj(states)
        states = states * mask[..., None].to(states.dtype)
        mask = mask.bool()
        if guidance:
            states = torch.cat([states, torch.zeros_like(states)])
            mask = torch.cat([mask, torch.zeros_like(mask)])
        return TextConditioning(states=states, mask=mask)

    @torch.no_grad()
    def set_conditioning(self, cond: TextConditioning, rows: slice | None = None) -> None:
        """Precompute every layer's cross-attention keys and values for `rows` (default: all; they do not
        change per step), padded to `text_tokens` keys."""
        rows, indices = self._indices(rows)
        n = len(indices)
        if cond.states.shape[0] != n:
            raise ValueError(f"conditioning has {cond.states.shape[0]} rows, the decoder rows {rows} are {n}")
        if self.text_tokens is None:
            self.text_tokens = cond.tokens
        if cond.tokens > self.text_tokens:
            raise ValueError(f"conditioning has {cond.tokens} text tokens, the decoder holds {self.text_tokens}")
        if not self.cross_k:
            shape = (self.rows, self.num_heads, self.text_tokens, self.head_dim)
            kw = dict(device=self.model.device, dtype=self.model.dtype)
            self.cross_k = [torch.zeros(shape, **kw) for _ in self.layers]
            self.cross_v = [torch.zeros(shape, **kw) for _ in self.layers]
            self.cross_bias = torch.full((self.rows, 1, 1, self.text_tokens), torch.finfo(self.model.dtype).min, **kw)
        pad = self.text_tokens - cond.tokens
        states = F.pad(cond.states, (0, 0, 0, pad))
        mask = F.pad(cond.mask, (0, pad))
        for i, layer in enumerate(self.layers):
            self.cross_k[i][rows] = self._heads(layer.encoder_attn.k_proj(states))
            self.cross_v[i][rows] = self._heads(layer.encoder_attn.v_proj(states))
        # Additive bias: fully masked rows (unconditional) see zero values, so their output is exactly 0.
        bias = torch.zeros(mask.shape, device=states.device, dtype=states.dtype)
        self.cross_bias[rows] = bias.masked_fill(~mask, torch.finfo(bias.dtype).min)[:, None, None, :]

    def reset(self, rows: slice | None = None) -> None:
        """Forget the audio context of `rows` (default all; the caches are reused, not reallocated)."""
        for r in self._indices(rows)[1]:
            self.lengths[r] = 0

    # --- forward ------------------------------------------------------------------------------------

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        r, t, _ = x.shape
        return x.view(r, t, self.num_heads, self.head_dim).transpose(1, 2)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        r, _, t, _ = x.shape
        return x.transpose(1, 2).reshape(r, t, self.num_heads * self.head_dim)

    @staticmethod
    def _steer(h: torch.Tensor, layer: int, steering: LayerSteering | None, cond_rows: int | None) -> torch.Tensor:
        if steering is None:
            return h
        if steering.rows == "both":
            return steering.steer(layer, h)
        half = cond_rows if cond_rows is not None else h.shape[0] // 2  # the guidance reference stays unsteered
        return torch.cat([steering.steer(layer, h[:half]), h[half:]])

    def _embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = sum(self.embed_tokens[c](tokens[:, c]) for c in range(tokens.shape[1]))
        return x + self.positions.weights[positions].to(x.dtype)

    def _cross(self, i: int, h: torch.Tensor, rows: slice) -> torch.Tensor:
        layer = self.layers[i]
        cross = layer.encoder_attn
        q = self._heads(cross.q_proj(layer.encoder_attn_layer_norm(h)))
        y = _attend(q, self.cross_k[i][rows], self.cross_v[i][rows], self.cross_bias[rows], cross.scaling)
        return cross.out_proj(self._merge(y))

    def _feed_forward(self, i: int, h: torch.Tensor) -> torch.Tensor:
        layer = self.layers[i]
        return layer.fc2(layer.activation_fn(layer.fc1(layer.final_layer_norm(h))))

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return torch.stack([head(h) for head in self.lm_heads], dim=1)  # [R, K, T, V]

    @torch.no_grad()
    def forward(
        self,
        tokens: torch.Tensor,
        steering: LayerSteering | None = None,
        capture: Callable[[int, torch.Tensor], None] | None = None,
        all_logits: bool = False,
        capture_site: str = "residual",
        rows: slice | None = None,
        cond_rows: int | None = None,
    ) -> torch.Tensor:
        """Feed `tokens` [B, K, T] to `rows` (default all; they share one cache length) at their next T cache
        positions; return logits [R, K, V] for the last position (or [R, K, T, V] with `all_logits`).
        `capture(layer, h)` sees the activations at the `capture_site` injection point (the residual stream,
        or the self-attention output), after steering. `cond_rows`: how many leading rows are conditional,
        for steering that spares the guidance rows (default: half)."""
        if capture_site not in INJECTION_POINTS:
            raise ValueError(f"capture_site must be one of {', '.join(INJECTION_POINTS)}, got {capture_site!r}")
        rows, indices = self._indices(rows)
        n = len(indices)
        b, k, t = tokens.shape
        start = self.lengths[indices[0]]
        if any(self.lengths[r] != start for r in indices):
            raise RuntimeError(f"rows {rows} hold caches of different lengths; feed them with step()")
        end = start + t
        if end > self.capacity:
            raise RuntimeError(f"decoder cache full: {end} positions > capacity {self.capacity}")
        if not self.cross_k:
            raise RuntimeError("set_conditioning() must be called before forward()")
        x = self._embed(tokens, torch.arange(start, end, device=tokens.device))
        h = x.repeat(n // b, 1, 1) if n != b else x
        # Causal mask for a block of t new positions after `start` cached ones (t == 1: none needed).
        mask = None
        if t > 1:
            mask = torch.ones(t, end, dtype=torch.bool, device=h.device).tril(diagonal=start)
        for i, layer in enumerate(self.layers):
            att = layer.self_attn
            y = layer.self_attn_layer_norm(h)
            self.k_cache[i][rows, :, start:end] = self._heads(att.k_proj(y))
            self.v_cache[i][rows, :, start:end] = self._heads(att.v_proj(y))
            y = F.scaled_dot_product_attention(
                self._heads(att.q_proj(y)), self.k_cache[i][rows, :, :end], self.v_cache[i][rows, :, :end],
                attn_mask=mask, scale=att.scaling,
            )
            y = att.out_proj(self._merge(y))
            if steering is not None and steering.site == "attention":
                y = self._steer(y, i, steering, cond_rows)
            if capture is not None and capture_site == "attention":
                capture(i, y)
            h = h + y
            h = h + self._cross(i, h, rows)
            h = h + self._feed_forward(i, h)
            if steering is not None and steering.site == "residual":
                h = self._steer(h, i, steering, cond_rows)
            if capture is not None and capture_site == "residual":
                capture(i, h)
        for r in indices:
            self.lengths[r] = end
        logits = self._logits(self.final_norm(h if all_logits else h[:, -1:]))  # [R, K, T', V]
        return logits if all_logits else logits[:, :, -1]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, stepping: list[bool], steering: RowSteering | None = None) -> torch.Tensor:
        """Feed one position to each of rows [0, M): `tokens` [M, K, 1]. A row with `stepping[r]` True takes
        its next cache position (its length grows by one); the others are computed but leave their cache as it
        was (their keys go to a scratch position past the capacity) and their logits mean nothing. Returns
        logits [M, K, V].

        Static shapes, so that a row's numbers do not depend on the others: every row attends over the whole
        capacity (positions past its length masked) and over `text_tokens` text keys. (Matrix products over
        M rows give the same row results for every M >= MIN_ROWS on the CPU; engine.loop pads to that.)"""
        write = self.write_positions(tokens.shape[0], stepping)
        logits = self.step_core(tokens, write, steering)
        self.advance(stepping)
        return logits

    def write_positions(self, m: int, stepping: list[bool]) -> torch.Tensor:
        """[M] cache positions `step` writes to: each stepping row's length, the scratch position for the others."""
        if len(stepping) != m or m > self.rows:
            raise ValueError(f"step over {m} rows with {len(stepping)} stepping flags; the decoder holds {self.rows}")
        if not self.cross_k:
            raise RuntimeError("set_conditioning() must be called before step()")
        full = [r for r in range(m) if stepping[r] and self.lengths[r] >= self.capacity]
        if full:
            raise RuntimeError(f"decoder cache full for rows {full}: re-prompt before stepping them")
        return torch.tensor([self.lengths[r] if stepping[r] else self.capacity for r in range(m)],
                            device=self.model.device)

    def advance(self, stepping: list[bool]) -> None:
        for r, steps in enumerate(stepping):
            if steps:
                self.lengths[r] += 1

    def step_core(self, tokens: torch.Tensor, write: torch.Tensor, steering: RowSteering | None) -> torch.Tensor:
        """The tensor work of `step`, nothing else: no host sync, no Python state read or written besides the caches
        (written in place at `write`), so that it can be captured (engine.graphs: a CUDA graph, a TorchScript trace)."""
        m = tokens.shape[0]
        h = self._embed(tokens, write.clamp(max=self.capacity - 1)[:, None])
        # Row r attends to its cache positions 0..write[r] (a scratch row to all: finite, and thrown away).
        keys = torch.arange(self.capacity + 1, device=h.device)
        bias = torch.zeros(m, self.capacity + 1, device=h.device, dtype=h.dtype)
        bias = bias.masked_fill(keys[None, :] > write[:, None], torch.finfo(h.dtype).min)[:, None, None, :]
        at = write.view(m, 1, 1, 1).expand(m, self.num_heads, 1, self.head_dim)
        rows = slice(0, m)
        for i, layer in enumerate(self.layers):
            att = layer.self_attn
            y = layer.self_attn_layer_norm(h)
            self.k_cache[i][rows].scatter_(2, at, self._heads(att.k_proj(y)))
            self.v_cache[i][rows].scatter_(2, at, self._heads(att.v_proj(y)))
            y = _attend(self._heads(att.q_proj(y)), self.k_cache[i][rows], self.v_cache[i][rows], bias, att.scaling)
            y = att.out_proj(self._merge(y))
            if steering is not None:
                y = steering.steer("attention", i, y)
            h = h + y
            h = h + self._cross(i, h, rows)
            h = h + self._feed_forward(i, h)
            if steering is not None:
                h = steering.steer("residual", i, h)
        return self._logits(self.final_norm(h))[:, :, -1]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention written out: batched products over (row, head) pairs give each row the same numbers whatever
    the batch holds (scaled_dot_product_attention's CPU kernels do not, measured). Softmax in float32."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale + bias
    return torch.matmul(scores.float().softmax(dim=-1).to(v.dtype), v)
