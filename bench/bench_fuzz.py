"""The live server under a seeded attack of malformed and valid-but-costly messages, measured from outside.

A real `musicrfm serve` process; a well-behaved listener plays session "fuzz" while WebSocket attackers and
an OSC sender send the generators of tests/server/fuzzing.py (the same ones tests/server/test_fuzz.py runs
at ~6,000 messages in CI) scaled to `--messages`. Printed, as a markdown table for docs/BENCHMARKS.md:
messages sent, server crashes (exit, traceback or exception lines), the listener's longest wait between
two audio frames and the silences it would have heard playing the audio as it arrived (a listener
buffering the server's lead hears only those longer than the lead), audio contiguity, and the server's peak resident memory.

    python bench/bench_fuzz.py --messages 10000
    python bench/bench_fuzz.py --messages 20000 --seed 7 --model musicgen-mini
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path[:0] = [str(TESTS), str(TESTS / "server")]  # the fuzzer and the live-server harness are the tests'

from fuzzing import COSTLY_KINDS, SEED, SESSION, RssSampler, build_attack, playback_gaps, run_attack  # noqa: E402
from live_client import LiveClient, contiguity_problems  # noqa: E402
from live_server import start_server, stop_server  # noqa: E402

BASE_MESSAGES = 6_000  # build_attack(scale=1) sends about this many (WebSocket + OSC)


def make_bank(model_name: str, path: Path) -> None:
    """Random unit directions notes:C / notes:G (the fuzzer's KNOWN keys) for the model."""
    import torch

    from musicrfm.engine.bank import DirectionBank
    from musicrfm.engine.model import load_model

    fp = load_model(model_name, device="cpu").fingerprint
    g = torch.Generator().manual_seed(0)
    DirectionBank.from_arrays("notes", ["C", "G"], torch.randn(2, fp.num_layers, fp.hidden_size, generator=g),
                              torch.rand(2, fp.num_layers, generator=g), fp, method="random", pooling="mean").save(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=10_000, help="about how many messages to send (default 10000)")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--model", default="tiny-random", help="default tiny-random (its audio is noise; timed for cost)")
    ap.add_argument("--costly", type=int, default=None, help="valid-but-costly messages (default: 5%% of --messages)")
    ap.add_argument("--costly-kinds", default=",".join(COSTLY_KINDS),
                    help=f"which valid-but-costly kinds to send (default: all: {','.join(COSTLY_KINDS)})")
    ap.add_argument("--threads", type=int, default=None, help="the server's `serve --threads` (default: its own)")
    args = ap.parse_args(argv)
    kinds = tuple(k for k in args.costly_kinds.split(",") if k)
    unknown = set(kinds) - set(COSTLY_KINDS)
    if unknown:
        ap.error(f"unknown costly kind(s) {sorted(unknown)}; choose from {', '.join(COSTLY_KINDS)}")
    scale = max(0.05, args.messages / BASE_MESSAGES)
    costly = args.costly if args.costly is not None else max(20, args.messages // 20)

    with tempfile.TemporaryDirectory() as tmp:
        bank = Path(tmp) / "notes.safetensors"
        make_bank(args.model, bank)
        threads = ("--threads", str(args.threads)) if args.threads else ()
        server = start_server(bank, Path(tmp) / "recordings", "--max-sessions", "16", *threads, model=args.model)
        try:
            attackers, datagrams = build_attack(args.seed, scale=scale, costly=costly, costly_kinds=kinds)
            planned = sum(len(a.frames) for a in attackers) + len(datagrams)
            print(f"attack: {planned} messages ({len(datagrams)} OSC datagrams) on {args.model}, seed {args.seed}",
                  file=sys.stderr)
            listener = LiveClient(server.ws_url(SESSION), keep_pcm=False)
            listener.request({"type": "transport", "command": "play", "id": "bench-play"})
            listener.wait_audio(3)
            started = time.monotonic()
            with RssSampler(server.process.pid) as rss:
                seconds, osc_sent = run_attack(server, attackers, datagrams, osc_seconds=max(8.0, scale * 8),
                                               timeout=max(60.0, scale * 40))
                ended = time.monotonic()
                time.sleep(1.0)
            with LiveClient(server.ws_url(SESSION)) as fresh:  # the server still answers a newcomer
                echo = fresh.request({"type": "set", "id": "fresh", "directions": {"notes:G": {"coefficient": 0.2}}})
            frames = listener.audio
            arrivals = [a.arrived for a in frames if started - 1 <= a.arrived <= ended + 1]
            sample_rate = listener.hello["sample_rate"]
            lead = float(listener.hello.get("lead_seconds", 0.5))
            listener.close()
        finally:
            code = stop_server(server)
    crashes = int(code != 0) + sum(1 for line in server.output if "traceback" in line.lower()
                                   or "exception" in line.lower() or line.startswith(("ERROR", "CRITICAL")))
    ws_sent = sum(a.sent for a in attackers)
    problems = [p for a in attackers for p in a.problems]
    errors = sum(len(a.errors) for a in attackers)
    gaps = playback_gaps(frames, sample_rate)
    gap = float(np.diff(arrivals).max()) if len(arrivals) > 1 else float("nan")
    print(f"| messages sent (WS + OSC) | {ws_sent + osc_sent:,} ({ws_sent:,} + {osc_sent:,}) in {seconds:.1f} s |")
    print(f"| error replies received | {errors:,} |")
    print(f"| attacker problems (could not send, no answer) | {len(problems)} |")
    print(f"| server crashes (exit / traceback / exception lines) | {crashes} |")
    print(f"| a newcomer's change echoed after the attack | {echo.get('type') == 'state'} |")
    print(f"| listener: longest wait between audio frames | {gap:.2f} s |")
    print(f"| listener played as it arrived: longest silence / all silences (lead {lead:g} s) | "
          f"{max(gaps):.2f} s / {sum(gaps):.2f} s |")
    print(f"| listener: contiguity problems | {len(contiguity_problems(frames))} |")
    print(f"| server RSS: before -> peak | {rss.baseline / 2**20:.0f} MB -> {rss.peak / 2**20:.0f} MB |")
    print(f"command: python bench/bench_fuzz.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"machine: {platform.machine()}, python {platform.python_version()}, "
          f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    for p in problems[:5]:
        print(f"problem: {p}", file=sys.stderr)
    return 0 if crashes == 0 and not problems else 1


if __name__ == "__main__":
    sys.exit(main())
