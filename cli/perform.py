"""`musicrfm perform score.toml`: play a score offline (render a WAV) or against a running server.

The command spans two packages that never import each other: offline (`--out` alone) is the server's
`Stream` driven without sockets (musicrfm.server.offline.perform_score), live (`--url`) is a client of a
running server (musicrfm.clients.perform.perform_live). So it lives here, in the root package, which may
import both; each half is imported only when the command runs (a live performance needs no torch).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

import musicrfm.clients
from musicrfm.clients.cli import positive_float
from musicrfm.engine.cli import DEFAULT_MODEL, add_bank_arg, add_model_args

# The scores that ship with the package (clients/scores/NAME.toml): `musicrfm perform example` plays one
# from any directory.
BUNDLED_SCORES = Path(musicrfm.clients.__file__).resolve().parent / "scores"


def bundled_scores() -> list[str]:
    """The names of the scores that ship with the package, sorted."""
    return sorted(p.stem for p in BUNDLED_SCORES.glob("*.toml"))


def resolve_score(path: Path) -> Path:
    """The score file a command line names: a file, else a bundled score's name (`example`, or
    `example.toml`). A missing file stays as given, for load_score to name."""
    if path.exists() or len(path.parts) != 1:
        return path
    bundled = BUNDLED_SCORES / (path.name if path.suffix == ".toml" else f"{path.name}.toml")
    return bundled if bundled.is_file() else path


def expected_tokens(path: Path) -> str:
    """The tokens_sha256 of an earlier performance's (or render's) .json sidecar, for --compare."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"--compare {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"--compare {path} is not a JSON sidecar: {str(exc).splitlines()[0]}") from None
    sha = data.get("tokens_sha256") if isinstance(data, dict) else None
    if not isinstance(sha, str) or not sha:
        raise ValueError(f"--compare {path} records no tokens_sha256 (a sidecar of `perform --out` or `generate`)")
    return sha


def cmd_perform(args: argparse.Namespace) -> int:
    from musicrfm.clients.perform import Performance, PerformError, perform_live, write_result
    from musicrfm.protocol.score import load_score
    from musicrfm.protocol.wav import check_writable

    if args.url is None and args.out is None:
        raise ValueError("perform needs --out FILE.wav (render offline) and/or --url URL (play on a server)")
    # What can be refused at once is: before a model loads or a server is asked to play for minutes.
    args.score = resolve_score(args.score)
    if args.out is not None:
        if args.out.suffix == ".json":
            raise ValueError(f"--out {args.out}: the sidecar goes to FILE.json, so --out must not end in .json")
        check_writable(args.out, "--out")
        check_writable(args.out.with_suffix(".json"), "--out's sidecar")
    expected = expected_tokens(args.compare) if args.compare is not None else None
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
        from musicrfm.engine.model import check_model_name
        from musicrfm.server.offline import perform_score

        score = load_score(args.score)
        check_model_name(args.model or score.model or DEFAULT_MODEL)
        run = perform_score(score, model_name=args.model, device=args.device, dtype=args.dtype,
                            banks=args.bank or None, progress=not args.quiet)
        perf = Performance(run.audio, run.sample_rate, score.frames, tokens_sha256(run.codes))
        mode = "offline"
    if args.out is not None:
        write_result(args.out, perf, score, mode)
        print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    print(f"tokens sha256 {perf.tokens_sha256}")
    if expected is not None:
        if perf.tokens_sha256 != expected:
            print(f"musicrfm: tokens differ: {args.compare} has sha256 {expected[:16]}..., this {mode} performance "
                  f"{(perf.tokens_sha256 or 'none')[:16]}...", file=sys.stderr)
            return 1
        print(f"tokens match {args.compare} (sha256 {expected[:16]}...)")
    return 0


def register(sub) -> None:
    p = sub.add_parser("perform", help="play a score (TOML of timed cues) offline to a WAV, or on a live server",
                       description="Offline (--out): render the score here. Live (--url): play it on a running "
                                   "`musicrfm serve`; the server records it. Same score and seed, same tokens: "
                                   "--compare checks that against an earlier performance.")
    p.add_argument("score", type=Path,
                   help=f"score file (TOML; docs/scores.md) or the name of a bundled one ({', '.join(bundled_scores())})")
    add_model_args(p, default=None, default_help=f"offline: the score's model, else {DEFAULT_MODEL}")
    add_bank_arg(p, help="offline: direction bank (.safetensors); repeatable (default: the score's banks, else the "
                         "bundled model's own)")
    p.add_argument("--out", type=Path, default=None, metavar="FILE.wav",
                   help="write the audio (+ a .json sidecar), in an existing folder")
    p.add_argument("--url", default=None, help="play on this server (ws://HOST:PORT/ws or HOST:PORT) instead")
    p.add_argument("--session", default=None, help="live: session name (default: a new perform-XXXX session)")
    p.add_argument("--token", default=None, help="live: the server's access token (servers off loopback need one)")
    p.add_argument("--timeout", type=positive_float, default=600.0, help="live: give up after this many seconds")
    p.add_argument("--compare", type=Path, default=None, metavar="PERF.json",
                   help="compare the tokens with an earlier performance's sidecar (e.g. the offline render of "
                        "the same score): one line says whether they match; exit 1 when they differ")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_perform)
