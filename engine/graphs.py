"""The batched decode step captured once per row count and replayed every step: a CUDA graph on a GPU, a
TorchScript trace on a CPU.

Why. A decode step runs some 25 operations per layer from Python. On a GPU, for a model the size of
musicgen-small or smaller, launching kernels costs more than computing, so the loop is launch-bound however many
streams share the batch; a CUDA graph records the step's kernels once and replays them with one launch. On a
CPU the operations themselves are the cost, but each one is a trip through Python holding the GIL: two lanes
(threads) stepping at once wait on each other (measured on 2 cores, 4 bundled-model streams a lane: 18 ms a step
alone, 26-29 ms with a second lane in the same process, 19.5 ms in another process). A traced step runs in
TorchScript's interpreter, in C++, with the GIL released for the whole step, so lanes step in parallel.

What makes the step capturable is in engine.decoder: `MusicgenDecoder.step_core` has static shapes (attention
over the whole cache capacity, `text_tokens` text keys, rows from a few buckets: engine.loop.padded_rows) and
no host synchronisation; the caches are written in place at positions read from a tensor. In a capture steering
is always applied (zero vectors for rows not steered), at one injection point: a step that steers at another
runs eagerly.
- CUDA graph: each row count gets static input buffers (tokens, write positions, steering vectors) and a graph;
  a step copies its inputs into the buffers and replays.
- Trace: the decoder's state (caches, cross-attention keys and mask) and the steering buffers are the traced
  function's inputs, not constants baked into it, so a prompt change, a join that reallocates the caches or a
  re-prompt is seen by the next replay; only the weights, which never change, are constants.

Falling back: when capturing fails, or when a captured step does not reproduce the eager step on the same inputs
(checked at capture, on the CPU bit for bit, which the trace gives: no operator is fused or reordered), the engine
steps eagerly and says why once (`reason`).

Why not torch.compile on the CPU: measured on musicgen-mini's step (bench/bench_capture.py --compile), it took 18-42 s
to compile, ran slower than eager, and changed the logits in the last bits (so tokens, so replays). TorchScript is
deprecated as of torch 2.13; a torch without it fails the capture, and the engine steps eagerly, saying why.

Not run here: no GPU was lent to the sessions that wrote this (docs/BENCHMARKS.md, "GPU"); bench/bench_gpu.py
measures graphs against eager the first time one is. The trace is measured in docs/BENCHMARKS.md ("Many
sessions").
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
        """Copy a step's steering in; False when it steers at another site or reads the hidden state (a quality
        control): that step runs eagerly."""
        if steering is None:
            self.vectors.zero_()
            self.norm.zero_()
            return True
        if steering.reads_state or any(site != self.site for site in steering.sites):
            return False
        vectors, norm = steering.at_site(self.site)
        self.vectors.copy_(vectors)
        if norm is None:
            self.norm.zero_()
        else:
            self.norm.copy_(norm)
        return True


@dataclass
class _Graph:
    """A CUDA graph of one row count over its static buffers."""

    graph: "torch.cuda.CUDAGraph"
    tokens: torch.Tensor
    write: torch.Tensor
    steering: StaticSteering
    logits: torch.Tensor

    def run(self, decoder: MusicgenDecoder, tokens: torch.Tensor, write: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.write.copy_(write)
        self.graph.replay()
        return self.logits.clone()


@dataclass
class _Trace:
    """A TorchScript trace of one row count; the decoder's state and the steering buffers go in at every call."""

    function: torch.jit.ScriptFunction
    steering: StaticSteering

    def run(self, decoder: MusicgenDecoder, tokens: torch.Tensor, write: torch.Tensor) -> torch.Tensor:
        return self.function(tokens, write, self.steering.vectors, self.steering.norm, *decoder.state())


class CapturedSteps:
    """Called like `MusicgenDecoder.step`; replays the step captured for its row count (module docstring): a CUDA
    graph on a CUDA device, a TorchScript trace elsewhere."""

    def __init__(self, decoder: MusicgenDecoder, site: str = "residual"):
        self.decoder = decoder
        self.site = site
        self.kind = "CUDA graph" if decoder.model.device.type == "cuda" else "trace"
        self._captured: dict[int, _Graph | _Trace] = {}
        self._caches: int | None = None  # id of the cache tensors the CUDA graphs were captured on
        self.reason: str | None = None  # why steps run eagerly (None: captures are in use)
        self.replays = 0

    def __call__(self, tokens: torch.Tensor, stepping: list[bool],
                 steering: BatchSteering | None = None) -> torch.Tensor:
        dec = self.decoder
        if self.reason is not None:
            return dec.step(tokens, stepping, steering)
        if self.kind == "CUDA graph" and self._caches != id(dec.k_cache[0]):
            self._captured.clear()  # the caches were reallocated (more rows): a graph holds their addresses
            self._caches = id(dec.k_cache[0])
        m = tokens.shape[0]
        write = dec.write_positions(m, stepping)
        captured = self._captured.get(m) or self._capture(m)
        if captured is None or not captured.steering.load(steering):
            logits = dec.step_core(tokens, write, steering)
        else:
            logits = captured.run(dec, tokens, write)
            self.replays += 1
        dec.advance(stepping)
        return logits

    @torch.no_grad()
    def _capture(self, m: int) -> _Graph | _Trace | None:
        dec = self.decoder
        try:
            device, dtype = dec.model.device, dec.model.dtype
            tokens = torch.full((m, dec.model.num_codebooks, 1), dec.model.pad_token_id, dtype=torch.long,
                                device=device)
            write = torch.full((m,), dec.capacity, dtype=torch.long, device=device)  # scratch: writes nothing kept
            steering = StaticSteering(self.site, m, len(dec.layers), dec.num_heads * dec.head_dim, device, dtype)
            captured = self._graph(tokens, write, steering) if self.kind == "CUDA graph" else \
                self._trace(tokens, write, steering)
            # The check runs on this engine's real caches and conditioning (written only at the scratch position),
            # a few times: TorchScript settles its plan after its first calls.
            expected = dec.step_core(tokens, write, steering)
            for _ in range(3):
                got = captured.run(dec, tokens, write)
                same = torch.equal(got, expected) if self.kind == "trace" else \
                    torch.allclose(got.float(), expected.float(), rtol=1e-3, atol=1e-3)
                if not same:
                    raise RuntimeError("a replay does not reproduce the eager step")
        except Exception as exc:  # any failure: step eagerly from now on, and say so once
            self.reason = f"capturing a {self.kind} of {m} rows failed ({type(exc).__name__}: {exc})"
            log.warning("%s; stepping eagerly", self.reason)
            return None
        self._captured[m] = captured
        return captured

    def _graph(self, tokens: torch.Tensor, write: torch.Tensor, steering: StaticSteering) -> _Graph:
        dec = self.decoder
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the main stream, as capture requires
            for _ in range(2):
                dec.step_core(tokens, write, steering)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = dec.step_core(tokens, write, steering)
        return _Graph(graph, tokens, write, steering, logits)

    def _trace(self, tokens: torch.Tensor, write: torch.Tensor, steering: StaticSteering) -> _Trace:
        dec, site = self.decoder, self.site

        def step(tokens: torch.Tensor, write: torch.Tensor, vectors: torch.Tensor, norm: torch.Tensor,
                 *state: torch.Tensor) -> torch.Tensor:
            # While tracing, the decoder reads the state tensors it is handed, so that they are the trace's inputs.
            kept = dec.state()
            dec.set_state(state)
            try:
                return dec.step_core(tokens, write, BatchSteering({site: vectors}, {site: norm}))
            finally:
                dec.set_state(kept)

        function = torch.jit.trace(step, (tokens, write, steering.vectors, steering.norm, *dec.state()),
                                   check_trace=False)
        return _Trace(function, steering)
