"""Streaming EnCodec decode against one-shot decode: error, seam discontinuity, and cost per chunk.

    python bench/bench_decode.py --model tiny-random
    python bench/bench_decode.py --model random-small --seconds 5 --chunk-frames 10

Prints markdown tables (docs/streaming-decode.md records a run):
1. error of the streamed audio against the one-shot decode of the same tokens, per left_context x
   hold_back, relative to the one-shot audio's RMS about its mean (`musicrfm.engine.audio.relative_error`);
2. sample-to-sample jumps at chunk seams (`musicrfm.engine.audio.seam_discontinuity`) for the defaults and for
   variants (plain cut, equal-power fade, too little context or hold-back, naive chunk-by-chunk decode);
3. decode time of one chunk at two points of a stream (default 10 s and 60 s), streaming decoder vs the
   transformers streamer's approach (re-decode every token so far).

Random-weight models (`tiny-random`, `random-small`) have the real codec architecture, but transformers
initialises their codebooks to zero, so every code decodes to the same embedding and the audio would not
depend on the tokens at all; `load_model` fills them with seeded Gaussian vectors (musicrfm.engine.model.seed_codebooks),
and the decoder's convolutions and LSTM keep their random weights. The audio is noise either way.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch


from musicrfm.engine.audio import (  # noqa: E402
    ExactStreamingDecoder,
    StreamingDecoder,
    decode_tokens,
    relative_error,
    seam_discontinuity,
)
from musicrfm.engine.model import load_model  # noqa: E402


@dataclass
class Run:
    audio: torch.Tensor
    seams: list[int]  # sample indices where a segment other than the first starts


def stream(codec, codes: torch.Tensor, chunk: int, exact: bool = False, **settings) -> Run:
    """Push `codes` in chunks of `chunk` frames through a fresh decoder (windowed with `settings`, or the exact
    one that carries the LSTM state), then flush."""
    decoder = ExactStreamingDecoder(codec) if exact else StreamingDecoder(codec, **settings)
    pieces = [decoder.push(codes[:, start : start + chunk]) for start in range(0, codes.shape[1], chunk)]
    pieces = [p for p in pieces + [decoder.flush()] if len(p)]
    starts = [0]
    for piece in pieces[:-1]:
        starts.append(starts[-1] + len(piece))
    return Run(torch.cat(pieces), starts[1:])


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores visible)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def error_grid(codec, codes, ref, chunk: int, lefts: list[int], holds: list[int], crossfade: int) -> str:
    rows = []
    for left in lefts:
        for hold in holds:
            run = stream(codec, codes, chunk, left_context=left, hold_back=hold, crossfade=crossfade)
            rms, peak = relative_error(run.audio, ref)
            rows.append([str(left), str(hold), f"{rms:.2e}", f"{peak:.2e}"])
    return table(["left_context", "hold_back", "RMS error", "max error"], rows)


def seam_table(codec, codes, ref, chunk: int, defaults: dict) -> str:
    variants = [
        ("streaming (defaults)", defaults),
        ("streaming, plain cut (crossfade 0)", {**defaults, "crossfade": 0}),
        ("streaming, equal-power crossfade", {**defaults, "curve": "equal_power"}),
        ("streaming, left_context 5", {**defaults, "left_context": 5}),
        ("streaming, hold_back 2 (right edge not final)", {**defaults, "hold_back": 2}),
        ("streaming, hold_back 2, plain cut", {**defaults, "hold_back": 2, "crossfade": 0}),
        ("streaming, hold_back 2, crossfade 640", {**defaults, "hold_back": 2, "crossfade": 640}),
        ("naive: each chunk decoded alone", {"left_context": 0, "hold_back": 0, "crossfade": 0}),
        ("exact (LSTM state carried; the default for EnCodec)", {"exact": True}),
    ]
    rows, default_seams = [], None
    for name, settings in variants:
        run = stream(codec, codes, chunk, **settings)
        default_seams = default_seams or run.seams
        step = seam_discontinuity(run.audio, run.seams, ref)
        own = seam_discontinuity(run.audio, run.seams)
        rms, peak = relative_error(run.audio, ref)
        rows.append([name, f"{step.mean:.2e}", f"{step.worst:.2e}", f"{step.between:.2e}", f"{own.mean:.3f}",
                     f"{own.worst:.3f}", f"{rms:.2e}", f"{peak:.2e}"])
    # The one-shot audio read at the default run's seams: what the reference-free ratio gives without seams.
    own = seam_discontinuity(ref, default_seams)
    rows.append(["one-shot decode, same positions", "0", "0", "0", f"{own.mean:.3f}", f"{own.worst:.3f}", "0", "0"])
    return table(["decode", "error step at seams, mean", "worst", "between seams", "own jump ratio, mean",
                  "worst", "RMS error", "max error"], rows)


def timing_table(codec, shape: tuple[int, int], chunk: int, points: list[float], frame_rate: float,
                 repeats: int) -> str:
    """Decode time of one chunk at `points` seconds into a stream: streaming vs re-decoding everything.

    Each stream is really run up to its point. Then the next push is timed on shallow copies of the
    decoder (a push only rebinds its state, so every copy starts from the same state), alternating
    between the points, and the fastest of `repeats` is shown: on a shared machine, the minimum of
    interleaved runs compares the points fairly.
    """
    vocab, books = shape
    frames = [round(p * frame_rate) for p in points]
    codes = torch.randint(0, vocab, (books, max(frames) + chunk), generator=torch.Generator().manual_seed(1))
    kinds = {"windowed": StreamingDecoder, "exact": ExactStreamingDecoder}
    decoders: dict[str, list] = {kind: [] for kind in kinds}
    for kind, make in kinds.items():
        for n in frames:
            decoder = make(codec)
            for start in range(0, n, chunk):
                decoder.push(codes[:, start : min(start + chunk, n)])
            decoders[kind].append(decoder)
    stream_s = {kind: [float("inf")] * len(points) for kind in kinds}
    windows = {kind: [0] * len(points) for kind in kinds}
    full_s = [float("inf")] * len(points)
    for _ in range(repeats):
        for i, n in enumerate(frames):
            for kind in kinds:
                trial = copy.copy(decoders[kind][i])
                t0 = time.perf_counter()
                trial.push(codes[:, n : n + chunk])
                stream_s[kind][i] = min(stream_s[kind][i], time.perf_counter() - t0)
                windows[kind][i] = trial.last_window_frames
            t0 = time.perf_counter()  # what the transformers streamer does here: decode every frame so far
            decode_tokens(codec, codes[:, : n + chunk])
            full_s[i] = min(full_s[i], time.perf_counter() - t0)

    def ms(seconds: list[float]) -> list[str]:
        return [f"{1e3 * x:.1f}" for x in seconds]

    exact, windowed = stream_s["exact"], stream_s["windowed"]
    return table(["per chunk", *(f"at {p:g} s" for p in points), "ratio last/first"], [
        ["streaming, exact (default), ms", *ms(exact), f"{exact[-1] / exact[0]:.2f}"],
        ["streaming, windowed (defaults), ms", *ms(windowed), f"{windowed[-1] / windowed[0]:.2f}"],
        ["windowed / exact", *(f"{w / e:.2f}" for w, e in zip(windowed, exact)), ""],
        ["full re-decode (transformers streamer), ms", *ms(full_s), f"{full_s[-1] / full_s[0]:.2f}"],
        ["frames through the first conv per push: exact, windowed",
         *(f"{e}, {w}" for e, w in zip(windows["exact"], windows["windowed"])), ""],
        ["real-time budget, ms", *(f"{1e3 * chunk / frame_rate:.1f}" for _ in points), ""],
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny-random", help="tiny-random | random-small (or real weights)")
    p.add_argument("--seconds", type=float, default=10.0, help="stream length for the error and seam tables")
    p.add_argument("--chunk-frames", type=int, default=10, help="frames per push (50 frames = 1 s)")
    p.add_argument("--left", type=int, nargs="+", default=[0, 10, 25, 50], help="left_context values (frames)")
    p.add_argument("--hold", type=int, nargs="+", default=[0, 2, 4, 10], help="hold_back values (frames)")
    p.add_argument("--timing-at", type=float, nargs="+", default=[10.0, 60.0], help="seconds into the stream")
    p.add_argument("--repeats", type=int, default=3, help="timing repeats, interleaved (the fastest is shown)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    model = load_model(args.model, device="cpu", dtype="float32")
    codec = model.hf.audio_encoder
    vocab = codec.config.codebook_size
    frames = round(args.seconds * model.frame_rate)
    codes = torch.randint(0, vocab, (model.num_codebooks, frames), generator=torch.Generator().manual_seed(args.seed))
    ref = decode_tokens(codec, codes)
    defaults = StreamingDecoder(codec).settings

    print(f"# bench_decode: {args.model}{' (random weights, seeded codebooks)' if model.is_random else ''}")
    print(f"date {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; {cpu_name()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; codec decoder "
          f"{sum(x.numel() for x in codec.decoder.parameters()) / 1e6:.2f} M parameters")
    print(f"command: python bench/bench_decode.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"stream {args.seconds:g} s = {frames} frames, {args.chunk_frames} frames per push; defaults: "
          f"left_context {defaults.left_context}, hold_back {defaults.hold_back}, crossfade {defaults.crossfade} "
          f"samples ({defaults.curve})\n")
    print(f"## 1. error vs one-shot decode (relative to one-shot RMS about its mean), crossfade {defaults.crossfade}\n")
    print(error_grid(codec, codes, ref, args.chunk_frames, args.left, args.hold, defaults.crossfade), "\n")
    print("## 2. seam discontinuity: max |first difference| within +-32 samples of each seam, over the same "
          "statistic of the one-shot audio between seams. 'error step' takes it on streamed - one-shot, "
          "'own jump ratio' on the streamed audio itself\n")
    print(seam_table(codec, codes, ref, args.chunk_frames, {
        "left_context": defaults.left_context, "hold_back": defaults.hold_back, "crossfade": defaults.crossfade}), "\n")
    print(f"## 3. decode time per chunk of {args.chunk_frames} frames\n")
    print(timing_table(codec, (vocab, model.num_codebooks), args.chunk_frames, args.timing_at, model.frame_rate, args.repeats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
