"""The typical size of a model's activations at an injection point: what relative steering strength is a
fraction of.

Relative strength s adds s x mean|h_l| x w_l x phi(t) x gate along each layer's unit direction, so s = 0.3
means "30 % of the layer's typical norm" on any model (engine.steering). The norms come from extraction
(probes/extract.py accumulates them over every clip it reads, with `NormAccumulator`); a bank made before
that is given them here, once at load, by `measure_layer_norms`: a short unsteered generation, then the
same teacher-forced pass extraction makes, over the generated tokens.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Sequence

import torch

from .bank import DirectionBank, LayerNorms
from .decoder import INJECTION_POINTS, MusicgenDecoder, delayed_inputs
from .loop import Generator
from .model import MusicModel, bundled_layer_norms, bundled_prompts

log = logging.getLogger("musicrfm.norms")

__all__ = ["NormAccumulator", "read_activations", "measure_layer_norms", "with_layer_norms"]

MEASURE_SECONDS = 2.0  # per prompt: enough tokens for a stable mean (the spread across tokens is ~10 %)
MEASURE_PROMPTS = 4


def read_activations(model: MusicModel, codes: torch.Tensor, prompt: str,
                     capture: Callable[[int, torch.Tensor], None], site: str = "residual") -> None:
    """Feed whole code sequences [B, K, F] in one teacher-forced pass (positions 0..F, as an audio prompt of
    F frames is fed; no guidance) and hand `capture(layer, h [B, F + 1, d])` the activations at `site`."""
    b, _, f = codes.shape
    dec = MusicgenDecoder(model, rows=b, capacity=f + 1)
    dec.set_conditioning(dec.encode_text([prompt] * b, guidance=False))
    tokens = delayed_inputs(codes.to(model.device), 0, f, model.pad_token_id)
    dec.forward(tokens, capture=capture, capture_site=site)


class NormAccumulator:
    """Running per-layer sums of the per-token norm |h| and its square, over the token positions given."""

    def __init__(self, num_layers: int):
        self.count = torch.zeros(num_layers, dtype=torch.float64)
        self.total = torch.zeros(num_layers, dtype=torch.float64)
        self.squares = torch.zeros(num_layers, dtype=torch.float64)

    def add(self, layer: int, h: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """h [..., d]; mask (h's leading shape, bool): the positions to count (padding and BOS left out)."""
        n = torch.linalg.vector_norm(h.float(), dim=-1).double().cpu()
        if mask is not None:
            n = n[mask.cpu()]
        self.count[layer] += n.numel()
        self.total[layer] += n.sum()
        self.squares[layer] += (n * n).sum()

    def add_sums(self, count: torch.Tensor, total: torch.Tensor, squares: torch.Tensor) -> None:
        """Merge sums kept elsewhere (a feature shard's), each [L]."""
        self.count += count.double()
        self.total += total.double()
        self.squares += squares.double()

    def result(self, source: str) -> LayerNorms:
        if bool((self.count < 1).any()):
            raise ValueError("no token was measured at some layer: cannot give its typical norm")
        mean = self.total / self.count
        var = (self.squares / self.count - mean * mean).clamp_min(0)
        return LayerNorms(tuple(float(m) for m in mean), tuple(math.sqrt(float(v)) for v in var),
                          int(self.count.min()), source)


@torch.no_grad()
def measure_layer_norms(model: MusicModel, site: str = "residual", prompts: Sequence[str] | None = None,
                        seconds: float = MEASURE_SECONDS, seed: int = 0) -> LayerNorms:
    """The typical |h| per layer at `site`: unsteered generations of `seconds` for each prompt (the model's
    example prompts, else the empty one), read back in one teacher-forced pass. Deterministic for (model,
    device, dtype, prompts, seconds, seed), so a render replays to the same strength."""
    if site not in INJECTION_POINTS:
        raise ValueError(f"site must be one of {', '.join(INJECTION_POINTS)}, got {site!r}")
    if prompts is None:
        prompts = tuple(bundled_prompts(model.name)[:MEASURE_PROMPTS]) or ("",)
    acc = NormAccumulator(model.num_layers)
    frames = max(2, round(seconds * model.frame_rate))
    for i, prompt in enumerate(prompts):
        gen = Generator(model, prompt, seed=seed + i, total_frames=frames)
        while not gen.finished:
            gen.chunk(50)
        codes = gen.codes()[None]
        read_activations(model, codes, prompt, lambda layer, h: acc.add(layer, h[:, 1:]), site)
    label = ", ".join(repr(p) for p in prompts)
    return acc.result(f"measured: {len(prompts)} unsteered {seconds:g} s generations ({label})"[:300])


def with_layer_norms(bank: DirectionBank | None, model: MusicModel, recorded: dict | None = None) -> DirectionBank | None:
    """`bank` with its layer norms: as it carries them; else as a sidecar or recording `recorded` them when it was
    made (so it replays to the same strength); else a bundled model's own (its recipe); else measured now (once;
    said in the log) for a bank made before banks carried them."""
    if bank is None or bank.layer_norms is not None:
        return bank
    if recorded is not None:
        return bank.with_layer_norms(LayerNorms.from_dict(recorded))
    bundled = bundled_layer_norms(model.name, bank.injection_point)
    if bundled is not None:  # a bundled model records its own (musicrfm mini export)
        return bank.with_layer_norms(LayerNorms.from_dict(bundled))
    log.warning("the direction bank carries no layer norms (made before musicrfm recorded them): measuring them "
                "with a short unsteered pass; re-export the bank to skip this")
    return bank.with_layer_norms(measure_layer_norms(model, bank.injection_point))
