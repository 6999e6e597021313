"""Next-token choice: classifier-free guidance, then temperature / top-k / top-p, or greedy."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from musicrfm.protocol import fields


@dataclass(frozen=True)
class SamplingConfig:
    """MusicGen's official defaults: guidance 3, top-k 250, temperature 1."""

    guidance_scale: float = 3.0
    temperature: float = 1.0
    top_k: int = 250
    top_p: float = 0.0  # 0 = off
    greedy: bool = False

    def __post_init__(self) -> None:
        for name in ("guidance_scale", "temperature", "top_p"):
            object.__setattr__(self, name, fields.number(f"sampling {name}", getattr(self, name)))
        if not isinstance(self.greedy, bool):
            raise ValueError(f"sampling greedy must be true or false, got {fields.shown(self.greedy)}")
        if self.guidance_scale < 0:
            raise ValueError(f"sampling guidance_scale must be >= 0, got {self.guidance_scale}")
        if self.temperature <= 0 and not self.greedy:
            raise ValueError(f"sampling temperature must be > 0 (or use greedy), got {self.temperature}")
        fields.whole("sampling top_k", self.top_k, 0)
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"sampling top_p must be in [0, 1] (0 = off), got {self.top_p}")

    @property
    def uses_guidance(self) -> bool:
        # Guidance at scale 1 is the conditional logits alone: skip the unconditional rows entirely.
        return self.guidance_scale != 1.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SamplingConfig":
        fields.fields("sampling", d, tuple(cls.__dataclass_fields__))  # a ValueError naming an unknown key
        return cls(**d)


def guided_logits(logits: torch.Tensor, cfg: SamplingConfig, batch: int) -> torch.Tensor:
    """[R, K, V] -> [B, K, V]: uncond + scale * (cond - uncond), as transformers and audiocraft do.
    R = 2B when the stream carries unconditional rows, else R = B (no guidance)."""
    if logits.shape[0] == batch:
        return logits
    cond, uncond = logits.float().chunk(2)
    return uncond + cfg.guidance_scale * (cond - uncond)


def sample_tokens(logits: torch.Tensor, cfg: SamplingConfig,
                  generator: torch.Generator | Sequence[torch.Generator]) -> torch.Tensor:
    """Choose one token per (row, codebook) from guided logits [B, K, V] -> [B, K]. With one generator per row
    (streams stepped together, each with its own RNG), row b draws from generator[b] alone: exactly what it
    draws when sampled by itself (top-k, top-p and softmax work row by row)."""
    if cfg.greedy:
        return logits.argmax(dim=-1)
    scores = logits.float() / cfg.temperature
    vocab = scores.shape[-1]
    if 0 < cfg.top_k < vocab:
        kth = torch.topk(scores, cfg.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if 0.0 < cfg.top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the mass before it already reaches top_p (the top token always stays).
        drop_sorted = (cum - sorted_scores.softmax(dim=-1)) >= cfg.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    probs = scores.softmax(dim=-1)
    if isinstance(generator, torch.Generator):
        return torch.multinomial(probs.reshape(-1, vocab), 1, generator=generator).reshape(logits.shape[:-1])
    return torch.stack([torch.multinomial(p, 1, generator=g)[:, 0] for p, g in zip(probs, generator)])
