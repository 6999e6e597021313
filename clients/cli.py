"""Client subcommands of `musicrfm` (musicrfm.main gathers every package's `register`): `listen`. Each
command has its own `_register_NAME(sub)`; `register` calls them all. Heavy imports wait until a command
runs. `perform` spans the server (offline) and the clients (live), so the root registers it
(musicrfm.perform); it uses `positive_float` from here."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _latency(text: str) -> str | float:
    return text if text in ("low", "high") else positive_float(text)


def cmd_listen(args) -> int:
    from .listen import FakeOutput, ListenError, SpeakerClient, SoundDeviceOutput, _Console, list_devices

    if args.list_devices:
        print(list_devices())
        return 0
    if not args.url:
        raise ValueError("listen needs a URL: musicrfm listen ws://HOST:PORT/ws?session=NAME (or HOST:PORT)")
    if args.out is not None:
        from musicrfm.protocol.wav import check_writable

        check_writable(args.out, "--out")  # before connecting, not when the first audio arrives
    if args.no_audio:
        output = FakeOutput(args.output_rate, keep=False)
    else:
        output = SoundDeviceOutput(args.device, rate=args.output_rate, latency=args.latency)
    console = _Console(status=not args.quiet)
    client = SpeakerClient(args.url, output, session=args.session, token=args.token, prebuffer=args.prebuffer,
                           max_seconds=args.max_buffer, play=args.play, out=args.out, seconds=args.seconds,
                           console=console, handle_sigint=True)
    try:
        result = asyncio.run(client.run())
    except KeyboardInterrupt:  # a second Ctrl-C
        print("interrupted", file=sys.stderr)
        return 130
    except ListenError as exc:
        print(f"musicrfm: error: {exc}", file=sys.stderr)
        return 2
    s = result.stats
    summary = f"received {result.stream_seconds:.2f} s"
    if s is not None:
        summary += f", underruns {s.underruns}"
        if s.gaps:
            summary += f", gaps {s.gaps} ({s.missing_stream_samples} samples filled with silence)"
        if s.overflows:
            summary += f", overflows {s.overflows} ({s.dropped_samples / result.output_rate:.2f} s dropped)"
    if args.out is not None and result.hello is not None:
        summary += f"; wrote {args.out}"
    how = "closed by us" if result.closed_by == "client" else "closed by the server"
    print(f"{summary}; {how} (code {result.close_code})")
    if not result.clean:
        print(f"musicrfm: error: the connection ended abnormally (code {result.close_code}"
              f"{': ' + result.close_reason if result.close_reason else ''})", file=sys.stderr)
        return 1
    return 0


def _register_listen(sub) -> None:
    p = sub.add_parser("listen", help="play a live session through the speakers (speaker client)",
                       description="Join a `musicrfm serve` session and play its audio through a sound card. "
                                   "Ctrl-C closes the connection cleanly.")
    p.add_argument("url", nargs="?", help="ws://HOST:PORT/ws?session=NAME, the page's http://HOST:PORT/?session=NAME, "
                                          "or HOST[:PORT] (port 8765 by default)")
    p.add_argument("--session", default=None, help="session name (overrides the URL's; default: main)")
    p.add_argument("--token", default=None, help="access token (servers that bind beyond loopback need one)")
    p.add_argument("--device", default=None, help="output device: index or part of its name (see --list-devices)")
    p.add_argument("--list-devices", action="store_true", help="list PortAudio's audio devices and exit")
    p.add_argument("--output-rate", type=int, default=None, metavar="HZ",
                   help="device sample rate (default: the stream's if the device takes it, else the device's own; "
                        "the client resamples)")
    p.add_argument("--latency", type=_latency, default="high",
                   help="PortAudio latency: low, high or seconds (default high)")
    p.add_argument("--no-audio", action="store_true", help="no sound card: receive (and --out) only")
    p.add_argument("--prebuffer", type=_nonnegative_float, default=0.2, metavar="SECONDS",
                   help="audio queued before playback starts, and after an underrun (default 0.2)")
    p.add_argument("--max-buffer", type=positive_float, default=2.0, metavar="SECONDS",
                   help="most audio queued; beyond it the oldest is dropped (default 2)")
    p.add_argument("--play", action="store_true", help="send play once connected (start or resume the session)")
    p.add_argument("--out", type=Path, default=None, metavar="FILE.wav", help="also write the received audio")
    p.add_argument("--seconds", type=positive_float, default=None,
                   help="stop after this much audio (default: until Ctrl-C or the server closes)")
    p.add_argument("--quiet", action="store_true", help="no status line")
    p.set_defaults(func=cmd_listen)


def register(sub) -> None:
    _register_listen(sub)
