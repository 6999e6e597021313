"""MusicGen's decoder, forward pass written out over the transformers weights, with a static KV cache.

Why not call the transformers modules step by step: the decode loop needs (a) a preallocated cache it
owns (no per-step allocation, cheap to reset when re-prompting), (b) steering applied inline at one
well-defined point instead of forward hooks (the reference code's hook silently steered batch row 0
only), and (c) the same code path for feature extraction, so probes read features exactly where the
engine later adds directions. The arithmetic is the transformers implementation's, op for op; a test
checks that greedy decoding gives the tokens `generate` gives.

Batch layout under classifier-free guidance: rows [0, B) are conditional, rows [B, 2B) unconditional
(zero text states, as transformers and audiocraft do).

INJECTION POINTS (`INJECTION_POINTS`, the one definition: banks and steering specs import it; probes/ reads
features at "residual"):
- "residual":  the residual stream at the output of decoder block l (after its feed-forward residual
               add, before the next block; for the last block, before the final LayerNorm).
- "attention": the output of block l's self-attention (after out_proj, before the residual add).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from .model import MusicModel

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
    """What the forward pass needs from steering: per-layer vectors, which rows, which rule, which site."""

    site: str
    rows: str  # "both" or "cond"

    def vector(self, layer: int) -> torch.Tensor | None:
        """[d] for one position, [T, d] for T positions, or None when layer `layer` is not steered."""

    def apply(self, h: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The update rule: returns the steered hidden states."""


@dataclass
class TextConditioning:
    """Projected text-encoder states for the cross-attention, already in CFG row layout."""

    states: torch.Tensor  # [R, S, d_model], R = B (no guidance) or 2B (cond rows, then uncond rows)
    mask: torch.Tensor  # [R, S] bool, True = attend


class MusicgenDecoder:
    """Forward pass over a loaded MusicGen's decoder weights with a cache of fixed capacity."""

    def __init__(self, model: MusicModel, rows: int, capacity: int):
        dec = model.hf.decoder.model.decoder
        self.model = model
        self.embed_tokens = dec.embed_tokens
        self.positions = dec.embed_positions
        self.layers = dec.layers
        self.final_norm = dec.layer_norm
        self.lm_heads = model.hf.decoder.lm_heads
        self.rows = rows
        self.capacity = capacity
        cfg = model.decoder_config
        self.num_heads = int(cfg.num_attention_heads)
        self.head_dim = int(cfg.hidden_size) // self.num_heads
        if capacity > self.positions.weights.shape[0]:
            raise ValueError(
                f"context of {capacity} steps exceeds the model's {self.positions.weights.shape[0]} positions"
            )
        shape = (rows, self.num_heads, capacity, self.head_dim)
        kw = dict(device=model.device, dtype=model.dtype)
        self.k_cache = [torch.zeros(shape, **kw) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, **kw) for _ in self.layers]
        self.cross_k: list[torch.Tensor] = []
        self.cross_v: list[torch.Tensor] = []
        self.cross_bias: torch.Tensor | None = None
        self.length = 0  # positions currently held in the cache

    # --- conditioning -------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_text(self, prompts: list[str], guidance: bool) -> TextConditioning:
        """T5-encode prompts once; with guidance, append the unconditional rows (zero states, masked)."""
        m = self.model
        batch = m.tokenizer(prompts, return_tensors="pt", padding=True)
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
    def set_conditioning(self, cond: TextConditioning) -> None:
        """Precompute every layer's cross-attention keys and values (they do not change per step)."""
        if cond.states.shape[0] != self.rows:
            raise ValueError(f"conditioning has {cond.states.shape[0]} rows, decoder has {self.rows}")
        self.cross_k = [self._heads(layer.encoder_attn.k_proj(cond.states)) for layer in self.layers]
        self.cross_v = [self._heads(layer.encoder_attn.v_proj(cond.states)) for layer in self.layers]
        # Additive bias: fully masked rows (unconditional) see zero values, so their output is exactly 0.
        bias = torch.zeros(cond.mask.shape, device=cond.states.device, dtype=cond.states.dtype)
        self.cross_bias = bias.masked_fill(~cond.mask, torch.finfo(bias.dtype).min)[:, None, None, :]

    def reset(self) -> None:
        """Forget the audio context (the caches are reused, not reallocated)."""
        self.length = 0

    # --- forward ------------------------------------------------------------------------------------

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        r, t, _ = x.shape
        return x.view(r, t, self.num_heads, self.head_dim).transpose(1, 2)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        r, _, t, _ = x.shape
        return x.transpose(1, 2).reshape(r, t, self.num_heads * self.head_dim)

    def _steer(self, h: torch.Tensor, layer: int, steering: LayerSteering | None) -> torch.Tensor:
        if steering is None:
            return h
        v = steering.vector(layer)
        if v is None:
            return h
        v = v.to(h.dtype)
        if steering.rows == "both":
            return steering.apply(h, v)
        half = h.shape[0] // 2  # conditional rows only: the guidance reference stays unsteered
        return torch.cat([steering.apply(h[:half], v), h[half:]])

    @torch.no_grad()
    def forward(
        self,
        tokens: torch.Tensor,
        steering: LayerSteering | None = None,
        capture: Callable[[int, torch.Tensor], None] | None = None,
        all_logits: bool = False,
        capture_site: str = "residual",
    ) -> torch.Tensor:
        """Feed `tokens` [B, K, T] at the next T cache positions; return logits [R, K, V] for the last
        position (or [R, K, T, V] with `all_logits`). `capture(layer, h)` sees the activations at the
        `capture_site` injection point (the residual stream, or the self-attention output), after steering."""
        if capture_site not in INJECTION_POINTS:
            raise ValueError(f"capture_site must be one of {', '.join(INJECTION_POINTS)}, got {capture_site!r}")
        b, k, t = tokens.shape
        start, end = self.length, self.length + t
        if end > self.capacity:
            raise RuntimeError(f"decoder cache full: {end} positions > capacity {self.capacity}")
        if not self.cross_k:
            raise RuntimeError("set_conditioning() must be called before forward()")
        x = sum(self.embed_tokens[c](tokens[:, c]) for c in range(k))
        x = x + self.positions.weights[start:end].to(x.dtype)
        h = x.repeat(self.rows // b, 1, 1) if self.rows != b else x
        # Causal mask for a block of t new positions after `start` cached ones (t == 1: none needed).
        mask = None
        if t > 1:
            mask = torch.ones(t, end, dtype=torch.bool, device=h.device).tril(diagonal=start)
        for i, layer in enumerate(self.layers):
            att = layer.self_attn
            y = layer.self_attn_layer_norm(h)
            self.k_cache[i][:, :, start:end] = self._heads(att.k_proj(y))
            self.v_cache[i][:, :, start:end] = self._heads(att.v_proj(y))
            y = F.scaled_dot_product_attention(
                self._heads(att.q_proj(y)), self.k_cache[i][:, :, :end], self.v_cache[i][:, :, :end],
                attn_mask=mask, scale=att.scaling,
            )
            y = att.out_proj(self._merge(y))
            if steering is not None and steering.site == "attention":
                y = self._steer(y, i, steering)
            if capture is not None and capture_site == "attention":
                capture(i, y)
            h = h + y
            cross = layer.encoder_attn
            y = cross.q_proj(layer.encoder_attn_layer_norm(h))
            y = F.scaled_dot_product_attention(
                self._heads(y), self.cross_k[i], self.cross_v[i], attn_mask=self.cross_bias, scale=cross.scaling
            )
            h = h + cross.out_proj(self._merge(y))
            h = h + layer.fc2(layer.activation_fn(layer.fc1(layer.final_layer_norm(h))))
            if steering is not None and steering.site == "residual":
                h = self._steer(h, i, steering)
            if capture is not None and capture_site == "residual":
                capture(i, h)
        self.length = end
        h = self.final_norm(h if all_logits else h[:, -1:])
        logits = torch.stack([head(h) for head in self.lm_heads], dim=1)  # [R, K, T', V]
        return logits if all_logits else logits[:, :, -1]
