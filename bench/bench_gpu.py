"""The engine on one device, in one run: what a GPU session needs measured, runnable on a CPU (smoke mode).

For each model (random-weight models have the real architecture and cost; their audio is noise):
  1. own loop vs transformers `generate`: one stream, same model, device, dtype, sampling (CFG 3, top-k 250),
     steps per second, whole runs interleaved (--repeats, medians); the own loop eagerly and replaying its
     captured step (engine.graphs: CUDA graphs on a GPU, a TorchScript trace on a CPU)
  2. steering overhead: the batched step with every stream steered (2 directions, all layers, gate 1) against
     the same streams unsteered, stepped in alternating blocks
  3. streams at real time: N streams on one engine (batched forward, EnCodec decode of each chunk batched),
     N = 1, 2, 4, ... until a chunk takes longer than its audio; per N the milliseconds per step and the
     real-time factor each stream gets; the largest N at >= 1x
  4. knob latency: with that many streams playing, the time from a change submitted to one of them until the
     chunk holding the first sample it can affect (`step x hop`) has been generated and decoded, chunks back
     to back

    python bench/bench_gpu.py                          # on a GPU: random-small,-medium,-large, bf16, captured
    python bench/bench_gpu.py --smoke                  # anywhere, in seconds: tiny-random on the CPU (CI)
    python bench/bench_gpu.py --models musicgen-mini --device cpu --max-streams 16

Each section prints a table; a last line holds everything as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import SAMPLING, random_bank, time_hf  # noqa: E402

from musicrfm.engine.loop import Engine, Generator  # noqa: E402
from musicrfm.engine.model import load_model  # noqa: E402
from musicrfm.engine.steering import DirectionControl, LayerWeighting, SteeringPlan, SteeringSpec  # noqa: E402
from musicrfm.server.state import ControlState  # noqa: E402
from musicrfm.server.stream import Cause, Stream, generate_together  # noqa: E402

CAUSE = Cause("score")
STEERED = {"notes:a": {"coefficient": 0.4}, "chords:b": {"coefficient": 0.3}}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def own_steps_per_second(model, steps: int, graphs: bool) -> float:
    """One stream, a fresh engine (its text encoding included, as generate's is)."""
    _sync(model.device)
    t0 = time.perf_counter()
    engine = Engine(model, min_rows=1, capture=graphs)
    Generator(model, "lofi piano", sampling=SAMPLING, seed=0, engine=engine).run(steps)
    _sync(model.device)
    return steps / (time.perf_counter() - t0)


def streams(model, bank, n: int, graphs: bool, steered: bool) -> list[Stream]:
    engine = Engine(model, slots=n, capture=graphs)
    out = []
    for i in range(n):
        s = Stream(model, bank, ControlState(prompt=f"lofi piano {i}", seed=i), engine=engine)
        if steered:
            s.submit({"type": "set", "directions": STEERED, "layers": {"mode": "all"}}, CAUSE)
        s.submit({"type": "transport", "command": "play"}, CAUSE)
        s.apply_due()
        out.append(s)
    return out


def chunk_seconds(model, group: list[Stream], steps: int) -> float:
    _sync(model.device)
    t0 = time.perf_counter()
    generate_together(group, steps)
    _sync(model.device)
    return time.perf_counter() - t0


def steering_overhead(model, bank, n: int, steps: int, blocks: int, graphs: bool) -> float:
    """Per cent more time per step with every stream steered (alternating blocks of `steps` steps)."""
    plain, steered = streams(model, bank, n, graphs, False), streams(model, bank, n, graphs, True)
    chunk_seconds(model, plain, steps), chunk_seconds(model, steered, steps)  # warm-up, graph capture
    spent = {"plain": 0.0, "steered": 0.0}
    for _ in range(blocks):
        spent["plain"] += chunk_seconds(model, plain, steps)
        spent["steered"] += chunk_seconds(model, steered, steps)
    return 100 * (spent["steered"] / spent["plain"] - 1)


def realtime_streams(model, bank, max_streams: int, steps: int, chunks: int, graphs: bool) -> list[dict]:
    rows = []
    n = 1
    while n <= max_streams:
        group = streams(model, bank, n, graphs, True)
        chunk_seconds(model, group, steps)  # warm-up: the delay pattern's first frames, graph capture
        took = statistics.median(chunk_seconds(model, group, steps) for _ in range(chunks))
        factor = steps / model.frame_rate / took
        rows.append({"streams": n, "ms_per_step": 1000 * took / steps, "x_realtime": factor})
        if factor < 1.0:
            break
        n *= 2
    return rows


def knob_latency(model, bank, n: int, steps: int, changes: int, graphs: bool) -> list[float]:
    group = streams(model, bank, n, graphs, True)
    generate_together(group, steps)
    hop = int(model.hop_length)
    out = []
    for i in range(changes):
        generate_together(group, steps)  # playing meanwhile
        _sync(model.device)
        t0 = time.perf_counter()
        change = group[0].submit({"type": "set", "directions": {"notes:a": {"coefficient": 0.1 * (i % 5)}}}, CAUSE)
        while group[0].samples_emitted <= change.step * hop:
            generate_together(group, steps)
        _sync(model.device)
        out.append(1000 * (time.perf_counter() - t0))
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="random-small,random-medium,random-large")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on a CPU")
    ap.add_argument("--steps", type=int, default=200, help="steps per timed run (sections 1-2)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk-steps", type=int, default=10)
    ap.add_argument("--max-streams", type=int, default=64)
    ap.add_argument("--knobs", type=int, default=20)
    ap.add_argument("--graphs", choices=("on", "off"), default="on",
                    help="replay the captured batched step (CUDA graphs on a GPU, a TorchScript trace on a CPU); "
                         "on: section 1 times eager and captured")
    ap.add_argument("--smoke", action="store_true", help="tiny-random on the CPU, a few steps: checks it runs")
    args = ap.parse_args(argv)
    if args.smoke:
        args.models, args.device, args.steps, args.repeats = "tiny-random", "cpu", 12, 1
        args.chunk_steps, args.max_streams, args.knobs = 5, 4, 2
    hf_logging.set_verbosity_error()
    report: dict = {"machine": platform.node(), "torch": torch.__version__, "models": {}}
    print(f"# bench_gpu  {time.strftime('%Y-%m-%dT%H:%M:%S')}  torch {torch.__version__}  "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA'}")
    for name in args.models.split(","):
        probe = load_model(name, device=args.device, dtype=args.dtype or "auto")
        cuda = probe.device.type == "cuda"
        model = probe if args.dtype or not cuda else load_model(name, device=args.device, dtype="bfloat16")
        graphs = args.graphs == "on"
        bank = random_bank(model)
        print(f"\n## {name}: {model.device.type}, {str(model.dtype).replace('torch.', '')}, "
              f"{('CUDA graphs' if cuda else 'trace') if graphs else 'eager'} ({model.num_layers} layers, d={model.hidden_size})")
        own_steps_per_second(model, 5, graphs), time_hf(model, 5)  # warm-up
        own, eager, hf = [], [], []
        for _ in range(args.repeats):  # interleaved, so drift hits all alike
            own.append(own_steps_per_second(model, args.steps, graphs))
            if graphs:
                eager.append(own_steps_per_second(model, args.steps, False))
            hf.append(time_hf(model, args.steps))
        o, h = statistics.median(own), statistics.median(hf)
        e = statistics.median(eager) if eager else o
        print(f"own loop {o:.1f} steps/s ({'captured' if graphs else 'eager'}), eager {e:.1f}, transformers generate "
              f"{h:.1f}: own / generate {o / h:.2f}x; one stream {o / model.frame_rate:.2f}x real time")
        overhead = {n: steering_overhead(model, bank, n, args.chunk_steps, max(2, args.repeats * 2), graphs)
                    for n in sorted({1, min(8, args.max_streams)})}
        print("steering overhead: " + ", ".join(f"{v:+.1f} % ({n} stream{'s' * (n > 1)})" for n, v in overhead.items()))
        rows = realtime_streams(model, bank, args.max_streams, args.chunk_steps, max(3, args.repeats), graphs)
        print("| streams | ms per step | x real time each |\n|---|---|---|")
        for r in rows:
            print(f"| {r['streams']} | {r['ms_per_step']:.2f} | {r['x_realtime']:.2f} |")
        held = max([r["streams"] for r in rows if r["x_realtime"] >= 1.0], default=0)
        print(f"streams at real time: {held}")
        latency = knob_latency(model, bank, max(1, held), args.chunk_steps, args.knobs, graphs)
        lat = sorted(latency)
        p95 = lat[max(0, round(0.95 * len(lat)) - 1)]
        print(f"knob latency with {max(1, held)} streams: p50 {statistics.median(lat):.0f} ms, p95 {p95:.0f} ms")
        report["models"][name] = {
            "device": model.device.type, "dtype": str(model.dtype).replace("torch.", ""), "graphs": graphs,
            "own_steps_per_s": o, "eager_steps_per_s": e, "generate_steps_per_s": h, "own_over_generate": o / h,
            "steering_overhead_pct": {str(n): v for n, v in overhead.items()}, "realtime": rows,
            "streams_at_realtime": held, "knob_latency_ms": {"p50": statistics.median(lat), "p95": p95}}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
