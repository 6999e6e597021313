"""`musicrfm perform score.toml`: play a score offline (render a WAV) or against a running server.

The command spans two packages that never import each other: offline (`--out` alone) is the server's
`Stream` driven without sockets (musicrfm.server.offline.perform_score), live (`--url`) is a client of a
running server (musicrfm.clients.perform.perform_live). So it lives here, in the root package, which may
import both; each half is imported only when the command runs (a live performance needs no torch).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from musicrfm.clients.cli import positive_float
from musicrfm.engine.cli import add_model_args


def cmd_perform(args: argparse.Namespace) -> int:
    from musicrfm.clients.perform import Performance, PerformError, perform_live, write_result
    from musicrfm.protocol.score import load_score

    if args.url is None and args.out is None:
        raise ValueError("perform needs --out FILE.wav (render offline) and/or --url URL (play on a server)")
    if args.url is not None:
        score = load_score(args.score)  # checked here first; recompiled for the server's frame rate
        try:
            perf = asyncio.run(perform_live(args.score, args.url, session=args.session, token=args.token,
                                            timeout=args.timeout))
        except PerformError as exc:
            print(f"musicrfm: error: {exc}", file=sys.stderr)
            return 2
        print(f"performed {perf.frames} frames on {args.url}; the server recorded {perf.recording['wav']}")
        mode = "live"
    else:
        from musicrfm.engine.generation import tokens_sha256
        from musicrfm.server.offline import perform_score

        score = load_score(args.score)
        run = perform_score(score, model_name=args.model, device=args.device, dtype=args.dtype,
                            banks=args.bank or None, progress=not args.quiet)
        perf = Performance(run.audio, run.sample_rate, score.frames, tokens_sha256(run.codes))
        mode = "offline"
    if args.out is not None:
        write_result(args.out, perf, score, mode)
        print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    print(f"tokens sha256 {perf.tokens_sha256}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("perform", help="play a score (TOML of timed cues) offline to a WAV, or on a live server",
                       description="Offline (--out): render the score here. Live (--url): play it on a running "
                                   "`musicrfm serve`; the server records it. Same score and seed, same tokens.")
    p.add_argument("score", type=Path, help="score file (TOML); see docs/scores.md")
    add_model_args(p)
    p.set_defaults(model=None)  # offline: the score's model unless given
    p.add_argument("--bank", action="append", type=Path, default=[], metavar="FILE",
                   help="offline: direction banks (default: the score's banks)")
    p.add_argument("--out", type=Path, default=None, metavar="FILE.wav", help="write the audio (+ a .json sidecar)")
    p.add_argument("--url", default=None, help="play on this server (ws://HOST:PORT/ws or HOST:PORT) instead")
    p.add_argument("--session", default=None, help="live: session name (default: a new perform-XXXX session)")
    p.add_argument("--token", default=None)
    p.add_argument("--timeout", type=positive_float, default=600.0, help="live: give up after this many seconds")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_perform)
