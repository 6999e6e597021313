"""The batched decode step captured as CUDA graphs: one graph per row count, replayed every step.

Why: a decode step launches some 25 kernels per layer from Python. On a GPU, for a model the size of
musicgen-small or smaller, launching costs more than computing, so the loop is launch-bound however many
streams share the batch. A CUDA graph records the step's kernels once and replays them with one launch.

What makes the step capturable is in engine.decoder: `MusicgenDecoder.step_core` has static shapes (attention
over the whole cache capacity, `text_tokens` text keys, rows from a few buckets: engine.loop.padded_rows) and
no host synchronisation; the caches are written in place at positions read from a tensor. Here each row count
gets static input buffers (tokens, write positions, steering vectors) and a graph; a step copies its inputs into
the buffers and replays. In a graph steering is always applied (zero vectors for rows not steered), at one
injection point: a step that steers at another runs eagerly.

Falling back: on a CPU, or when capturing fails, or when a captured step does not reproduce the eager step on the
same inputs (checked once per row count, at capture), the engine steps eagerly and says why once (`reason`).

Not run here: no GPU was lent to the sessions that wrote this (docs/BENCHMARKS.md, "GPU"); bench/bench_gpu.py
measures it, eager against graphs, the first time one is.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .decoder import MusicgenDecoder
from .steering import BatchSteering

log = logging.getLogger("musicrfm.graphs")
__all__ = ["CapturedSteps"]


class StaticSteering(BatchSteering):
    """A BatchSteering over fixed buffers, at one site: every row's vectors, and which rows take the
    norm-preserving rule (always given, so every row goes through the same update). A graph captured with it
    reads whatever the buffers hold when it replays."""

    def __init__(self, site: str, rows: int, layers: int, width: int, device: torch.device, dtype: torch.dtype):
        self.site = site
        self.vectors = torch.zeros(rows, layers, width, device=device, dtype=dtype)
        self.norm = torch.zeros(rows, 1, 1, dtype=torch.bool, device=device)
        super().__init__({site: self.vectors}, {site: self.norm})

    def load(self, steering: BatchSteering | None) -> bool:
        """Copy a step's steering in; False when it steers at another site (that step runs eagerly)."""
        if steering is None:
            self.vectors.zero_()
            self.norm.zero_()
            return True
        if any(site != self.site for site in steering.sites):
            return False
        vectors, norm = steering.at_site(self.site)
        self.vectors.copy_(vectors)
        if norm is None:
            self.norm.zero_()
        else:
            self.norm.copy_(norm)
        return True


@dataclass
class _Captured:
    graph: "torch.cuda.CUDAGraph"
    tokens: torch.Tensor
    write: torch.Tensor
    steering: StaticSteering
    logits: torch.Tensor


class CapturedSteps:
    """Called like `MusicgenDecoder.step`; replays a CUDA graph per row count (module docstring)."""

    def __init__(self, decoder: MusicgenDecoder, site: str = "residual"):
        self.decoder = decoder
        self.site = site
        self._graphs: dict[int, _Captured] = {}
        self._caches: int | None = None  # id of the cache tensors the graphs were captured on
        self.reason: str | None = None  # why steps run eagerly (None: graphs are in use)
        if decoder.model.device.type != "cuda":
            self.reason = "CUDA graphs need a CUDA device"
        self.replays = 0

    def __call__(self, tokens: torch.Tensor, stepping: list[bool],
                 steering: BatchSteering | None = None) -> torch.Tensor:
        dec = self.decoder
        if self.reason is not None:
            return dec.step(tokens, stepping, steering)
        if self._caches != id(dec.k_cache[0]):  # the caches were reallocated (more rows): capture again
            self._graphs.clear()
            self._caches = id(dec.k_cache[0])
        m = tokens.shape[0]
        write = dec.write_positions(m, stepping)
        captured = self._graphs.get(m) or self._capture(m)
        if captured is None or not captured.steering.load(steering):
            logits = dec.step_core(tokens, write, steering)
        else:
            captured.tokens.copy_(tokens)
            captured.write.copy_(write)
            captured.graph.replay()
            logits = captured.logits.clone()
            self.replays += 1
        dec.advance(stepping)
        return logits

    @torch.no_grad()
    def _capture(self, m: int) -> _Captured | None:
        dec = self.decoder
        try:
            device, dtype = dec.model.device, dec.model.dtype
            tokens = torch.full((m, dec.model.num_codebooks, 1), dec.model.pad_token_id, dtype=torch.long,
                                device=device)
            write = torch.full((m,), dec.capacity, dtype=torch.long, device=device)  # scratch: writes nothing kept
            steering = StaticSteering(self.site, m, len(dec.layers), dec.num_heads * dec.head_dim, device, dtype)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up off the main stream, as capture requires
                for _ in range(2):
                    dec.step_core(tokens, write, steering)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = dec.step_core(tokens, write, steering)
            graph.replay()
            expected = dec.step_core(tokens, write, steering)
            if not torch.allclose(logits.float(), expected.float(), rtol=1e-3, atol=1e-3):
                raise RuntimeError("a replay does not reproduce the eager step")
        except Exception as exc:  # any failure: step eagerly from now on, and say so once
            self.reason = f"capturing a CUDA graph of {m} rows failed ({type(exc).__name__}: {exc})"
            log.warning("%s; stepping eagerly", self.reason)
            return None
        captured = _Captured(graph, tokens, write, steering, logits)
        self._graphs[m] = captured
        return captured
