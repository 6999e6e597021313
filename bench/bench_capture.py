"""The captured step and EnCodec stacks (engine.graphs, engine.audio.CapturedStacks) against eager, in one run.

Why capture on a CPU at all: the server's lanes are threads of one process, and an eager step is hundreds of
operations issued from Python, each taking the GIL; a TorchScript trace runs in C++ with the GIL released.
  1. one batched step of --streams streams (2 rows each under guidance, padded as the engine pads): ms per step
     eagerly, traced, and with --compile torch.compile (inductor); the time to make each; whether its logits are
     the eager logits bit for bit (max difference otherwise); and eagerly with a quality control on every stream
     (`quality:minor`, which reads the hidden state, so the engine never captures such a step)
  2. the GIL: two lanes (two engines, two threads) stepping at once, each its own --streams streams: ms per step
     each, eager and traced, beside the same step alone
  3. the exact EnCodec decoder: --streams streams' chunks of --chunk-frames frames decoded together (push_together),
     eagerly and through CapturedStacks: ms per push (after the traces are made), identical audio or not
Timed runs interleave (eager, traced, eager, ...) --repeats times; medians.

    python bench/bench_capture.py --model musicgen-mini --streams 4 --repeats 5
    python bench/bench_capture.py --model musicgen-mini --streams 4 --compile     # + torch.compile (slow to make)
    python bench/bench_capture.py --smoke                                         # tiny-random, seconds (tests)

Random-weight models make noise; they have the real architecture and cost, which is what is timed.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import threading
import time
from typing import Callable

import torch
from transformers.utils import logging as hf_logging

from musicrfm.engine.audio import CapturedStacks, ExactStreamingDecoder, push_together
from musicrfm.engine.graphs import CapturedSteps
from musicrfm.engine.loop import Engine, Generator
from musicrfm.engine.model import MusicModel, load_model
from musicrfm.engine.bank import DirectionBank
from musicrfm.engine.steering import (PITCH_CLASSES, BatchSteering, DirectionControl, LayerWeighting, SteeringPlan,
                                      SteeringSpec)


def _engine(model: MusicModel, streams: int, warm_steps: int) -> Engine:
    """An engine holding `streams` streams that have generated `warm_steps` steps (caches part full)."""
    engine = Engine(model, slots=streams)
    gens = [Generator(model, f"prompt {i}", seed=i, engine=engine) for i in range(streams)]
    for _ in range(warm_steps):
        engine.step(gens)
    return engine


def _ms(fn: Callable[[], object], calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1000


def _interleaved(fns: dict[str, Callable[[], object]], calls: int, repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_ms(fn, calls))
    return {name: statistics.median(t) for name, t in times.items()}


@torch.no_grad()
def one_step(model: MusicModel, streams: int, calls: int, repeats: int, compile_too: bool) -> dict:
    """Section 1: the batched step's tensor work (step_core), eager and captured, on the same inputs."""
    engine = _engine(model, streams, warm_steps=20)
    dec = engine.decoder
    m = engine.padded(streams * engine.rows_per_slot)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, int(model.decoder_config.vocab_size), (m, model.num_codebooks, 1), generator=g)
    write = torch.full((m,), dec.capacity, dtype=torch.long)  # the scratch position: the caches keep their state
    vectors = 0.1 * torch.randn(m, model.num_layers, model.hidden_size, generator=g)
    norm = torch.zeros(m, 1, 1, dtype=torch.bool)
    steering = BatchSteering({"residual": vectors}, {"residual": norm})
    expected = dec.step_core(tokens, write, steering)
    ways: dict[str, Callable[[], torch.Tensor]] = {"eager": lambda: dec.step_core(tokens, write, steering)}
    # A quality control on every stream (random notes directions: the cost is the reading and the gather).
    fp = model.fingerprint
    notes = DirectionBank.from_arrays("notes", list(PITCH_CLASSES), torch.randn(12, fp.num_layers, fp.hidden_size,
                                                                                generator=g),
                                      torch.rand(12, fp.num_layers, generator=g), fp, method="bench", pooling="mean")
    plan = SteeringPlan.compile(SteeringSpec(controls=(DirectionControl("notes:C", 0.1),
                                                       DirectionControl("quality:minor", 0.1)),
                                             units="raw", layers=LayerWeighting("all")), notes, fp)
    per_stream = plan.at([0])
    reading = BatchSteering.stack(m, [(slice(2 * i, 2 * i + 2), per_stream) for i in range(streams)])
    ways["quality"] = lambda: dec.step_core(tokens, write, reading)
    made: dict[str, float] = {}
    t0 = time.perf_counter()
    captured = CapturedSteps(dec, "residual")._capture(m)
    made["trace"] = time.perf_counter() - t0
    if captured is not None:
        captured.steering.load(steering)
        ways["trace"] = lambda: captured.run(dec, tokens, write)
    if compile_too:
        compiled = torch.compile(lambda t, w: dec.step_core(t, w, steering), dynamic=False)
        t0 = time.perf_counter()
        compiled(tokens, write)
        made["compile"] = time.perf_counter() - t0
        ways["compile"] = lambda: compiled(tokens, write)
    ms = _interleaved(ways, calls, repeats)
    out = {"rows": m, "ms": ms, "make_s": made}
    out["max_diff"] = {name: float((fn() - expected).abs().max()) for name, fn in ways.items()
                       if name not in ("eager", "quality")}
    return out


@torch.no_grad()
def two_lanes(model: MusicModel, streams: int, calls: int, repeats: int) -> dict:
    """Section 2: two engines stepping at once in two threads, eager and traced, and each alone."""
    lanes = []
    for _ in range(2):
        eager = _engine(model, streams, warm_steps=10)
        gens = list(eager.streams)
        traced = Engine(model, slots=streams, capture=True)
        tgens = [Generator(model, f"prompt {i}", seed=i, engine=traced) for i in range(streams)]
        traced.step(tgens)  # the trace is made here, not while timed
        lanes.append({"eager": (eager, gens), "trace": (traced, tgens)})

    def together(kind: str) -> list[float]:
        results: list[float] = [0.0, 0.0]

        def run(i: int) -> None:
            engine, gens = lanes[i][kind]
            results[i] = _ms(lambda: engine.step(gens), calls)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results

    alone: dict[str, list[float]] = {"eager": [], "trace": []}
    both: dict[str, list[float]] = {"eager": [], "trace": []}
    for _ in range(repeats):
        for kind in ("eager", "trace"):
            engine, gens = lanes[0][kind]
            alone[kind].append(_ms(lambda: engine.step(gens), calls))
            both[kind].append(statistics.mean(together(kind)))
    return {kind: {"alone_ms": statistics.median(alone[kind]), "two_threads_ms": statistics.median(both[kind])}
            for kind in alone}


@torch.no_grad()
def codec(model: MusicModel, streams: int, chunk: int, pushes: int, repeats: int) -> dict:
    """Section 3: the exact decoder's pushes for `streams` streams together, eager and through CapturedStacks."""
    codec_module = model.hf.audio_encoder
    vocab = int(model.decoder_config.vocab_size)
    g = torch.Generator().manual_seed(1)
    codes = [torch.randint(0, vocab, (model.num_codebooks, chunk * pushes), generator=g) for _ in range(streams)]
    stacks = CapturedStacks()

    def decode(with_stacks: bool) -> list[torch.Tensor]:
        decoders = [ExactStreamingDecoder(codec_module, stacks=stacks if with_stacks else None)
                    for _ in range(streams)]
        pieces: list[list[torch.Tensor]] = [[] for _ in decoders]
        for i in range(0, chunk * pushes, chunk):
            for p, audio in zip(pieces, push_together(decoders, [c[:, i:i + chunk] for c in codes])):
                p.append(audio)
        return [torch.cat([*p, d.flush()]) for p, d in zip(pieces, decoders)]

    expected = decode(False)
    same = all(torch.equal(a, b) for a, b in zip(decode(True), expected))  # makes the traces too
    ms = _interleaved({"eager": lambda: decode(False), "trace": lambda: decode(True)}, 1, repeats)
    return {"streams": streams, "chunk_frames": chunk, "ms_per_push": {k: v / pushes for k, v in ms.items()},
            "identical": same, "traces": len(stacks._traces), "reason": stacks.reason}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="musicgen-mini")
    ap.add_argument("--streams", type=int, default=4, help="streams per lane (a 2-core server at 8 sessions: 4)")
    ap.add_argument("--calls", type=int, default=50, help="steps per timed run")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--chunk-frames", type=int, default=5)
    ap.add_argument("--pushes", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the server's lanes: 1 each)")
    ap.add_argument("--compile", action="store_true", help="time torch.compile (inductor) too; slow to make")
    ap.add_argument("--smoke", action="store_true", help="tiny-random, a few calls: checks it runs")
    args = ap.parse_args(argv)
    if args.smoke:
        args.model, args.streams, args.calls, args.repeats, args.pushes = "tiny-random", 2, 3, 1, 6
    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    model = load_model(args.model, device="cpu")
    print(f"# bench_capture  {time.strftime('%Y-%m-%dT%H:%M:%S')}  {model.name} on cpu "
          f"({platform.processor() or platform.machine()}), torch {torch.__version__}, {args.threads} torch thread(s)")
    step = one_step(model, args.streams, args.calls, args.repeats, args.compile)
    print(f"\n1. one batched step, {args.streams} streams ({step['rows']} rows)")
    for name, ms in step["ms"].items():
        if name == "eager":
            extra = ""
        elif name == "quality":
            extra = f"; eager, every stream with a quality control ({ms / step['ms']['eager']:.2f}x eager)"
        else:
            extra = (f"; made in {step['make_s'][name]:.2f} s; logits "
                     + ("identical" if step["max_diff"][name] == 0 else f"differ (max {step['max_diff'][name]:.1e})"))
        print(f"   {name:8s} {ms:7.2f} ms{extra}")
    lanes = two_lanes(model, args.streams, args.calls, args.repeats)
    print(f"\n2. two lanes in two threads, {args.streams} streams each: ms per step (alone -> both at once)")
    for kind, row in lanes.items():
        print(f"   {kind:8s} {row['alone_ms']:7.2f} -> {row['two_threads_ms']:7.2f} ms "
              f"({row['two_threads_ms'] / row['alone_ms']:.2f}x)")
    dec = codec(model, args.streams, args.chunk_frames, args.pushes, args.repeats)
    print(f"\n3. EnCodec, {args.streams} streams' {args.chunk_frames}-frame pushes together: ms per push")
    print(f"   eager {dec['ms_per_push']['eager']:.2f}, traced {dec['ms_per_push']['trace']:.2f} "
          f"({dec['traces']} traces; audio {'identical' if dec['identical'] else 'DIFFERS'})")
    report = {"model": model.name, "step": step, "two_lanes": lanes, "codec": dec}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
