"""`musicrfm serve` (the live server) and `musicrfm replay` (regenerate a recording)."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path
from urllib.parse import quote


def compute_threads(requested: int | None, device: str) -> int | None:
    """Torch's CPU threads for the model: `requested`, or on a CPU device one core fewer than the machine has, so
    that the event loop (every client's messages, state broadcasts, audio frames) keeps a core of its own (on 2
    cores, 2 torch threads let a flood of messages stall a listener 1.1 s where 1 thread kept it at 0.3 s:
    docs/BENCHMARKS.md); None: leave torch's default (a GPU does the model's work)."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads must be >= 1, got {requested}")
        return requested
    if device != "cpu":
        return None
    return max(1, (os.cpu_count() or 1) - 1)


CAPTURE_CHOICES = ("auto", "on", "off")


def captures(capture: str, device: str) -> bool:
    """Whether the lanes replay a captured step (engine.graphs). "auto": on a CPU (a TorchScript trace, checked bit
    for bit against the eager step when made), not on a GPU, where CUDA graphs have not been measured yet."""
    if capture not in CAPTURE_CHOICES:
        raise ValueError(f"capture must be one of {', '.join(CAPTURE_CHOICES)}, got {capture!r}")
    return capture == "on" or (capture == "auto" and device == "cpu")


def cmd_serve(args) -> int:
    import torch

    from musicrfm.engine.model import NOISE_WARNING, bundled_banks, check_model_name, load_model
    from musicrfm.engine.generation import load_banks
    from musicrfm.engine.norms import with_layer_norms
    from musicrfm.engine.sampling import SamplingConfig

    from musicrfm.engine.steering import SteeringSpec

    from .app import RELATIVE_KNOB_MAX, Server, ServerConfig, new_token
    from musicrfm.protocol.wire import DEFAULT_OSC_PORT, is_loopback
    from .session import SessionConfig
    from .state import ControlState

    logging.getLogger("musicrfm").setLevel(logging.INFO)
    token = args.token
    osc_port = DEFAULT_OSC_PORT if args.osc_port is None else args.osc_port  # < 0: no OSC
    if token is None and (not is_loopback(args.host) or (osc_port >= 0 and not is_loopback(args.osc_host))):
        token = new_token()
        print(f"not loopback: clients need ?token={token} (OSC senders: /musicrfm/auth \"{token}\" first)")
    sampling = SamplingConfig(guidance_scale=args.guidance, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, greedy=args.greedy)
    # The model name, the banks and the recording folder are checked before the model loads.
    check_model_name(args.model)
    if args.record_dir.exists() and not args.record_dir.is_dir():
        raise ValueError(f"--record-dir {args.record_dir} is a file, not a directory")
    bank_paths = list(args.bank) or bundled_banks(args.model)  # a bundled model's own banks by default
    bank = load_banks(bank_paths)
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    threads = compute_threads(args.threads, model.device.type)
    if threads is not None:
        torch.set_num_threads(threads)
    bank = with_layer_norms(bank, model)  # relative strength needs them; a bank made before they were kept
    knob_max = args.coefficient_max
    if knob_max is None:  # the same full knob in either units: raw units scale it by the typical layer norm
        knob_max = RELATIVE_KNOB_MAX
        if args.units == "raw" and bank is not None and bank.layer_norms is not None:
            knob_max = round(RELATIVE_KNOB_MAX * sum(bank.layer_norms.mean) / bank.layer_norms.num_layers, 3)
    config = ServerConfig(
        host=args.host, port=args.port, osc_host=args.osc_host,
        osc_port=osc_port if osc_port >= 0 else None,
        token=token, max_sessions=args.max_sessions, idle_seconds=args.idle_seconds,
        coefficient_max=knob_max, allow_origins=tuple(args.allow_origin),
        allow_hosts=tuple(args.allow_host),
        session=SessionConfig(chunk_steps=args.chunk_steps, lead_seconds=args.lead, record_dir=args.record_dir,
                              record_max_seconds=args.record_max_seconds, record_max_mb=args.record_max_mb,
                              record_min_free_mb=args.record_min_free_mb),
        initial=ControlState(prompt=args.prompt, sampling=sampling, seed=args.seed,
                             steering=SteeringSpec(units=args.units)),
        lanes=args.lanes, capture=captures(args.capture, model.device.type),
    )

    def ready(server) -> None:
        host, port = server.ws_address
        print(f"musicrfm serving {model.describe()}", flush=True)
        if model.device.type == "cpu":
            print(f"torch threads: {torch.get_num_threads()} (--threads); lanes: {server.hub.scheduler.lanes} "
                  f"(--lanes: sessions are shared out over them, each lane steps its own in one batch)", flush=True)
        captured = server.hub.engines[0].captured  # what the engines do (engine.graphs picks the kind by device)
        kind = "a TorchScript trace" if captured is not None and captured.kind == "trace" else "a CUDA graph"
        print(f"steps: {f'captured, {kind} per batch size' if captured is not None else 'eager'} (--capture)",
              flush=True)
        if model.is_random:
            print(f"note: {NOISE_WARNING}", flush=True)
        if bank_paths:
            print(f"banks: {', '.join(str(p) for p in bank_paths)}", flush=True)
        # With a token, the URLs carry it: they are the ones to open or hand out as printed.
        key = f"token={quote(token, safe='')}" if token else ""
        print(f"page: http://{host}:{port}/{'?' + key if key else ''}   "
              f"websocket: ws://{host}:{port}/ws?session=main{'&' + key if key else ''}", flush=True)
        if server.osc_address:
            print(f"osc: udp {server.osc_address[0]}:{server.osc_address[1]}", flush=True)
        print("ready", flush=True)

    server = Server(model, bank, bank_paths, config)
    asyncio.run(server.run(ready))
    return 0


def cmd_replay(args) -> int:
    from musicrfm.engine.audio import write_wav
    from musicrfm.protocol.wav import check_writable

    from .recording import REPLAY_AUDIO_TOLERANCE, plan_replay, recorded_decoding, replay
    from .session import SessionConfig

    plan = plan_replay(args.log)  # the log and its WAV, checked before any model loads
    log, rate = plan.log, plan.log.header["frame_rate"]
    out = check_writable(args.out or args.log.with_name(args.log.stem + "-replay.wav"), "--out")
    if log.partial:
        print(f"{args.log}: the last line was cut off mid-write; read the {log.lines} whole lines before it")
    got = "complete (it has its end line)" if log.end else "cut off (no end line)"
    print(f"the recording is {got}: frames {plan.first}..{plan.end} ({(plan.end - plan.first) / rate:.2f} s), "
          f"its end from {plan.how}")
    # Windowed audio depends on how the frames were pushed: replay such a log at the server's default chunk.
    windowed = recorded_decoding(log.header) == "windowed"
    chunk_steps = args.chunk_steps if args.chunk_steps is not None else (SessionConfig.chunk_steps if windowed else 50)
    if chunk_steps < 1:
        raise ValueError(f"--chunk-steps must be >= 1, got {chunk_steps}")
    result = replay(args.log, plan=plan, progress=not args.quiet, chunk_steps=chunk_steps)
    first, end = plan.first, plan.first + result.codes.shape[1]
    print(f"regenerated the stream from step 0 to frame {end}: frames {first}..{end} ({(end - first) / rate:.2f} s) "
          f"to compare with the recording")
    if result.expected_sha256 is not None and result.matches:
        print(f"tokens match the recording (sha256 {result.tokens_sha256[:16]}...)")
    if result.audio_difference is not None and result.audio_difference <= REPLAY_AUDIO_TOLERANCE:
        print(f"audio matches the recorded WAV over its first {result.compared_samples} samples "
              f"(largest difference {result.audio_difference:.2g})")
    if result.expected_sha256 is None and result.audio_difference is None:
        print("nothing to compare: the log has no end line and no WAV lies beside it")
    if not result.ok:
        for problem in result.problems:
            print(f"musicrfm: replay differs: {problem}", file=sys.stderr)
        print(f"not writing {out}: the replay does not match the recording (same model, device and dtype "
              f"are needed)", file=sys.stderr)
        return 1
    write_wav(out, result.audio, result.sample_rate)
    print(f"wrote {out}")
    return 0


def register(sub) -> None:
    from musicrfm.engine.cli import add_bank_arg, add_model_args, add_units_arg

    s = sub.add_parser("serve", help="the live steering server: WebSocket (+ browser page) and OSC",
                       description="Serve live steering sessions: the browser page and a WebSocket on --port, OSC "
                                   "on --osc-port. It prints the page's URL (with its ?token= when there is one).")
    add_model_args(s)
    add_bank_arg(s)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (anything but loopback needs --token)")
    s.add_argument("--port", type=int, default=8765, help="WebSocket + page port (0: any free port)")
    s.add_argument("--osc-host", default="127.0.0.1", help="address the OSC port binds")
    s.add_argument("--osc-port", type=int, default=None, help="OSC UDP port (default 9000; -1: no OSC)")
    s.add_argument("--token", default=None, help="clients must pass ?token=...; required off loopback "
                                                 "(default: none on loopback, else one made up and printed)")
    s.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="a web page origin (scheme://host[:port]) that may use this server, besides the server's own "
                        "page and loopback pages; repeatable")
    s.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="a host name the server answers to, besides IP addresses, localhost and --host (a guard "
                        "against DNS rebinding); repeatable")
    s.add_argument("--lead", type=float, default=0.5, help="seconds of audio generated ahead of playback")
    s.add_argument("--chunk-steps", type=int, default=5, help="generation steps per audio chunk (50 = 1 s)")
    s.add_argument("--record-dir", type=Path, default=Path("recordings"),
                   help="where recordings (WAV + .jsonl log) are written; created at the first recording")
    s.add_argument("--record-max-seconds", type=float, default=3600.0,
                   help="a recording stops (complete, replayable) at this length (default: %(default)g)")
    s.add_argument("--record-max-mb", type=float, default=1024.0,
                   help="... or when its WAV and log reach this many MB (default: %(default)g)")
    s.add_argument("--record-min-free-mb", type=float, default=512.0,
                   help="a recording does not start with less free disk than this under --record-dir "
                        "(default: %(default)g)")
    s.add_argument("--max-sessions", type=int, default=8,
                   help="sessions at once; one place is kept for 'main' (default: %(default)s)")
    s.add_argument("--idle-seconds", type=float, default=300.0,
                   help="a session with no listener and no message for this long is closed, freeing its name and "
                        "place (default: %(default)g)")
    s.add_argument("--coefficient-max", type=float, default=None,
                   help="the full knob (OSC /knob 1, the page's knob at its top) in --units (default: 1.0 relative, "
                        "i.e. each layer's typical norm; in raw units the same strength in hidden-state units)")
    add_units_arg(s)
    s.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for the model (default: on CPU, one fewer than the cores, leaving the "
                        "event loop one; on a GPU, torch's default)")
    s.add_argument("--lanes", type=int, default=None,
                   help="lanes of sessions, each a thread stepping its sessions in one batched forward (default: 1 "
                        "on a GPU; on a CPU one per core, at most 8)")
    s.add_argument("--capture", choices=CAPTURE_CHOICES, default="auto",
                   help="replay the batched step captured once per batch size: a TorchScript trace on a CPU (lanes "
                        "then step in parallel, free of the GIL), a CUDA graph on a GPU; falls back to eager, saying "
                        "why (default auto: on a CPU only)")
    s.add_argument("--prompt", default="", help="a new session's prompt")
    s.add_argument("--seed", type=int, default=0, help="a new session's seed")
    g = s.add_argument_group("sampling (a new session's)")
    g.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (1 = off)")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    g.add_argument("--top-k", type=int, default=250, help="sample among the k likeliest codes (0: all)")
    g.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling mass (0: off)")
    g.add_argument("--greedy", action="store_true", help="take the likeliest code instead of sampling")
    s.set_defaults(func=cmd_serve)

    r = sub.add_parser("replay", help="regenerate a recorded session from its JSONL log and check the tokens",
                       description="Regenerate a recording made by `musicrfm serve` from its .jsonl log (same "
                                   "model, device and dtype) and compare the tokens with the log's end line and "
                                   "the audio with the WAV beside it. Exit 0 and write --out when everything "
                                   "compared matches; exit 1, writing nothing, when anything differs. A "
                                   "recording cut off by a crash replays as far as it got.")
    r.add_argument("log", type=Path, help="the .jsonl written beside a recording")
    r.add_argument("--out", type=Path, default=None,
                   help="output WAV, in an existing folder (default: LOG-replay.wav beside the log)")
    r.add_argument("--chunk-steps", type=int, default=None,
                   help="steps generated per audio chunk (default: 50; for a log from before the exact EnCodec "
                        "decoder, whose audio depends on it, 5 as `serve` made it)")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.set_defaults(func=cmd_replay)
