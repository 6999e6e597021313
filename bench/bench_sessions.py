"""Streams on one device, solo stepping vs batched, side by side in one run.

For each N in --sessions, N live streams (server.stream.Stream: playing, steered on two random directions at
different strengths, different prompts and seeds) each generate --rounds chunks of --chunk-steps steps as fast
as they can, the way the server's sessions ask for them:
  solo     how the server ran sessions before the batched engine: each stream on an engine of its own, in a
           worker thread of its own (N threads stepping at once: N forward passes, N Python loops, N EnCodec
           decodes per step, competing for the cores and the GIL), with the windowed EnCodec decoder it had
           then (--solo-decoder exact gives solo streams today's decoder, to see the engine's part alone)
  batched  server.scheduler.DeviceScheduler, its lanes as `musicrfm serve` makes them (one per core on a CPU),
           the N streams shared out over them; each lane steps the streams that wait together in one batched
           forward and decodes their chunks in one EnCodec call; the forward run eagerly, op by op from Python
  captured the server now (`serve --capture auto`): the same, each lane replaying its captured step (engine.graphs:
           a TorchScript trace on a CPU, free of the GIL, so the lanes step in parallel; CUDA graphs on a GPU)
The modes alternate per N (solo, batched, captured, solo, ... --repeats times; medians). Reported per N and
mode: the audio each stream gets per wall-clock second (x real time: >= 1 holds real time, given the lead the
server keeps), and CPU seconds spent per second of audio per stream (process time, all threads). Then the most
streams held at real time in each mode.

    python bench/bench_sessions.py --model musicgen-mini --sessions 1,2,4,8,16 --rounds 10 --repeats 3
    (--modes solo,captured: the two ends alone)

Random-weight models make noise; they have the real architecture and cost, which is what is timed.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from transformers.utils import logging as hf_logging

from bench_engine import random_bank
from musicrfm.engine.audio import StreamingDecoder
from musicrfm.engine.loop import Engine
from musicrfm.engine.model import load_model
from musicrfm.server.app import default_lanes
from musicrfm.server.cli import compute_threads
from musicrfm.server.scheduler import DeviceScheduler
from musicrfm.server.state import ControlState
from musicrfm.server.stream import Cause, Stream, generate_together

PROMPTS = ("lofi piano", "drums and bass", "a string quartet", "synth pads", "jazz guitar", "a choir")
CAUSE = Cause("score")


def make_streams(model, bank, n: int, scheduler: DeviceScheduler | None) -> list[Stream]:
    """N playing streams; on the scheduler's lanes (as the server shares them out), or each on its own engine."""
    streams = []
    for i in range(n):
        engine = scheduler.engine_for_new_stream() if scheduler is not None else None
        s = Stream(model, bank, ControlState(prompt=PROMPTS[i % len(PROMPTS)], seed=i), engine=engine)
        s.submit({"type": "set", "directions": {"notes:a": {"coefficient": 0.2 + 0.1 * (i % 3)},
                                                "chords:b": {"coefficient": -0.15}}}, CAUSE)
        s.submit({"type": "transport", "command": "play"}, CAUSE)
        s.apply_due()
        streams.append(s)
    return streams


def run_solo(streams: list[Stream], steps: int, rounds: int) -> tuple[float, float, int]:
    """Each stream in its own thread, `rounds` chunks; (wall s, CPU s, fewest samples any stream got)."""
    wall, cpu = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(len(streams)) as pool:
        samples = list(pool.map(lambda s: sum(s.generate(steps).audio.shape[0] for _ in range(rounds)), streams))
    return time.perf_counter() - wall, time.process_time() - cpu, min(samples)


def run_batched(streams: list[Stream], scheduler: DeviceScheduler, steps: int, rounds: int) -> tuple[float, float, int]:
    """The streams as sessions of the scheduler, each asking for its next chunk as soon as it has the last."""
    async def session(stream: Stream) -> int:
        return sum([(await scheduler.generate(stream, steps)).audio.shape[0] for _ in range(rounds)])

    async def all_sessions() -> list[int]:
        return await asyncio.gather(*(session(s) for s in streams))

    wall, cpu = time.perf_counter(), time.process_time()
    samples = asyncio.run(all_sessions())
    return time.perf_counter() - wall, time.process_time() - cpu, min(samples)


MODES = ("solo", "batched", "captured")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="musicgen-mini")
    ap.add_argument("--sessions", default="1,2,4,8,16")
    ap.add_argument("--modes", default=",".join(MODES), help=f"some of {', '.join(MODES)}")
    ap.add_argument("--chunk-steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=10, help="chunks per stream in one measurement")
    ap.add_argument("--repeats", type=int, default=3, help="measurements per mode and N (medians)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: as `musicrfm serve`)")
    ap.add_argument("--lanes", type=int, default=None, help="the scheduler's lanes (default: as `musicrfm serve`)")
    ap.add_argument("--solo-decoder", choices=("windowed", "exact"), default="windowed",
                    help="EnCodec decoder of the solo streams: windowed (the server before) or exact (today's)")
    args = ap.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if not modes or any(m not in MODES for m in modes):
        ap.error(f"--modes: some of {', '.join(MODES)}, got {args.modes!r}")
    hf_logging.set_verbosity_error()
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    threads = compute_threads(args.threads, model.device.type)
    if threads is not None:
        torch.set_num_threads(threads)
    bank = random_bank(model)
    chunk_seconds = args.chunk_steps / model.frame_rate
    lanes = args.lanes or default_lanes(model.device.type)
    print(f"# {model.name} on {model.device.type} ({platform.processor() or platform.machine()}), "
          f"{torch.get_num_threads()} torch threads, {lanes} lanes, chunks of {args.chunk_steps} steps "
          f"({chunk_seconds * 1000:.0f} ms); solo streams decode {args.solo_decoder}")
    print(f"{'streams':>7} " + " ".join(f"{m + ' x rt':>12}" for m in modes) + " "
          + " ".join(f"{m + ' cpu/s':>13}" for m in modes) + f" {'speed-up':>9}")
    held = {m: 0 for m in modes}
    for n in (int(x) for x in args.sessions.split(",")):
        schedulers, runs = [], {}
        for mode in modes:
            if mode == "solo":
                solo = make_streams(model, bank, n, None)
                if args.solo_decoder == "windowed":
                    for s in solo:
                        s.decoder = StreamingDecoder(model.hf.audio_encoder)
                generate_together(solo, args.chunk_steps)  # warm-up: the delay pattern's first frames, allocations
                runs[mode] = lambda streams=solo: run_solo(streams, args.chunk_steps, args.rounds)
            else:
                engines = [Engine(model, slots=max(1, n // lanes), capture=mode == "captured") for _ in range(lanes)]
                scheduler = DeviceScheduler(model.frame_rate, engines)
                schedulers.append(scheduler)
                streams = make_streams(model, bank, n, scheduler)
                run_batched(streams, scheduler, args.chunk_steps, 1)  # warm-up, and each lane's capture
                runs[mode] = lambda streams=streams, scheduler=scheduler: run_batched(streams, scheduler,
                                                                                      args.chunk_steps, args.rounds)
        walls: dict[str, list[float]] = {m: [] for m in modes}
        cpus: dict[str, list[float]] = {m: [] for m in modes}
        for _ in range(args.repeats):
            for mode, run in runs.items():
                wall, cpu, samples = run()
                walls[mode].append(wall / (samples / model.sample_rate))  # wall seconds per audio second
                cpus[mode].append(cpu / (samples / model.sample_rate) / n)
        for scheduler in schedulers:
            scheduler.close()
        factor = {m: 1 / statistics.median(walls[m]) for m in modes}
        cpu = {m: statistics.median(cpus[m]) for m in modes}
        for m in modes:
            if factor[m] >= 1.0:
                held[m] = max(held[m], n)
        speedup = f"{factor[modes[-1]] / factor[modes[0]]:>8.2f}x" if len(modes) > 1 else ""
        print(f"{n:>7} " + " ".join(f"{factor[m]:>11.2f}x" for m in modes) + " "
              + " ".join(f"{cpu[m]:>12.3f}s" for m in modes) + f" {speedup}")
        sys.stdout.flush()
    first, last = modes[0], modes[-1]
    ratio = f"{held[last] / held[first]:.1f}x" if held[first] else f"n/a ({first} holds none)"
    print("streams held at real time: " + ", ".join(f"{m} {held[m]}" for m in modes)
          + (f" ({last} / {first}: {ratio})" if len(modes) > 1 else ""))


if __name__ == "__main__":
    main()
