"""`musicrfm eval sweep`: steered and reference clips over one of the paper's protocols, measured."""

from __future__ import annotations

import sys
from pathlib import Path


def _floats(text: str | None, what: str) -> tuple[float, ...] | None:
    if not text:
        return None
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{what} {text!r}: expected comma-separated numbers, e.g. 0.15,0.3") from None


def cmd_eval_sweep(args) -> int:
    from musicrfm.engine.generation import check_seconds
    from musicrfm.engine.model import NOISE_LABEL, bundled_banks, bundled_prompts, check_model_name
    from musicrfm.engine.sampling import SamplingConfig

    from .presets import PAPER, SweepSettings
    from .run import run_sweep

    # Checked before any model loads (the sweep checks its banks and concepts then too).
    check_model_name(args.model)
    check_seconds(args.seconds, "--seconds")
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} is a file; a sweep writes a directory")
    prompts = tuple(p.strip() for p in args.prompts.split(",") if p.strip()) if args.prompts else ()
    if args.prompts_file:
        prompts += tuple(line.strip() for line in args.prompts_file.read_text().splitlines() if line.strip())
    prompts = prompts or bundled_prompts(args.model)
    banks = args.bank or bundled_banks(args.model)
    settings = SweepSettings(
        preset=args.preset, banks=tuple(str(b) for b in banks), out=str(args.out), model=args.model,
        concepts=tuple(c.strip() for c in args.concept.split(",") if c.strip()),
        **({"prompts": prompts} if prompts else {}), samples=args.samples, seconds=args.seconds, seed=args.seed,
        eta0=_floats(args.eta0, "--eta0"), units=args.units, layers=args.layers,
        device=None if args.device == "auto" else args.device, dtype=None if args.dtype == "auto" else args.dtype,
        sampling=SamplingConfig(guidance_scale=args.guidance, top_k=args.top_k, temperature=args.temperature),
        features=str(args.features) if args.features else None, clap=args.clap, embedder=args.embedder, probe_layer=args.probe_layer,
        probe_trials=args.probe_trials, probe_seed=args.probe_seed, probe_device=args.probe_device,
        window=args.window, hop=args.hop,
        chunk=args.chunk, save_audio=args.save_audio, threads=args.threads)
    print(f"sweep {settings.preset}: {PAPER[settings.preset]}", file=sys.stderr)
    result = run_sweep(settings, ray=args.ray, workers=args.workers, progress=not args.quiet)
    note = f" [{NOISE_LABEL}]" if result.random_weights else ""
    print(f"{result.generated} clips generated, {result.skipped} already done{note}")
    for name, path in result.files.items():
        print(f"{name}: {path}")
    return 0


def register(sub) -> None:
    from musicrfm.engine.cli import add_bank_arg, add_model_args, add_units_arg

    ev = sub.add_parser("eval", help="evaluate steering: sweeps that follow the paper's protocols")
    ev_sub = ev.add_subparsers(dest="evaluation", required=True)
    sw = ev_sub.add_parser("sweep", help="generate steered and reference clips over a preset and measure them "
                                         "(FD, MMD², CLAP, checks, probe accuracy); resumable; --ray to fan out")
    add_model_args(sw)
    # Written out (presets.PRESETS, checked by a test): the command line is built without importing torch.
    sw.add_argument("--preset", required=True,
                    choices=["eta", "pairs", "schedules", "crossfade", "layers", "topk", "gate", "methods",
                             "chord-quality"],
                    help="eta: Table 2 / Fig. 2; pairs: Table 5; schedules: Table 6 / Fig. 1a; crossfade: Sec. 6.2 / "
                         "Fig. 1b; layers: Table 8; topk: Table 9; gate: Table 10; methods: MusicRFM vs linear-probe "
                         "steering (attention bank, chosen layer, norm-preserving) at matched strength (give both "
                         "banks with --bank); chord-quality: every root x quality, the root steered with the notes "
                         "bank (--concept chords; --eta0 the quality levels, default 0.5,1)")
    add_bank_arg(sw, help="direction bank holding the concepts; repeatable (default: the bundled model's own banks)")
    sw.add_argument("--concept", default="notes", help="comma-separated concepts to steer (pairs: two or more)")
    sw.add_argument("--prompts", default=None, help='comma-separated text prompts, cycled over samples '
                                                    "(default: a bundled model's example prompts, else four "
                                                    "generic music prompts)")
    sw.add_argument("--prompts-file", type=Path, default=None, help="more prompts, one per line (commas allowed)")
    sw.add_argument("--samples", type=int, default=8, help="clips per configuration (and in the reference set)")
    sw.add_argument("--seconds", type=float, default=10.0, help="length of each clip, > 0 and at most a day")
    sw.add_argument("--seed", type=int, default=0, help="sweep seed: each sample's seed derives from it and the index")
    sw.add_argument("--eta0", default=None, help="strengths, in --units. eta: the levels (default relative "
                                                 "0.1,0.25,0.5,1; raw: the paper's 0.15,0.3,0.45,0.6); pairs: the "
                                                 "levels (0.25,0.5; raw 0.3,0.6); methods: matched strengths "
                                                 "m in (0, 1) (0.25,0.5,0.75); others: one value (0.5; raw 0.45)")
    add_units_arg(sw)
    sw.add_argument("--layers", default=None,
                    help="layer weighting where a preset uses the paper's optimal one (eta, pairs, schedules, "
                         "crossfade), e.g. exponential:kappa=0.95,margin=0 for the paper's exact min-max "
                         "(default: exponential:kappa=0.95,w0=1 with the 0.1 margin)")
    sw.add_argument("--out", type=Path, required=True, help="output directory (a rerun resumes it)")
    sw.add_argument("--features", type=Path, default=None,
                    help="`musicrfm extract` output (DIR/<concept>/): fit the multiclass probe and report probe "
                         "accuracy (tempos: the RFM regressor's BPM)")
    sw.add_argument("--probe-layer", type=int, default=None, help="probe at this layer (default: best by validation)")
    sw.add_argument("--probe-trials", type=int, default=None, help="RFM search trials for the probe (default: 100)")
    sw.add_argument("--probe-seed", type=int, default=0, help="split / search seed (as `musicrfm train --seed`)")
    sw.add_argument("--probe-device", default="auto", help="where the probe is fitted (default: cuda if present)")
    sw.add_argument("--clap", default=None, metavar="MODEL",
                    help="CLAP weights (HF id in the local cache or a directory): CLAP embedding for FD/MMD and "
                         "CLAP score; without it FD/MMD use --embedder and CLAP is 'unavailable'")
    sw.add_argument("--embedder", default="logmel-stats-v1", choices=["logmel-stats-v1", "logmel-timbre-v1"],
                    help="the offline embedding for FD/MMD without CLAP: logmel-stats-v1 (log-mel statistics and the "
                         "pitch-class profile) or logmel-timbre-v1 (without the profile: on notes/chords sweeps it "
                         "leaves out the change steering aims at)")
    sw.add_argument("--window", type=float, default=1.0, help="trace window, seconds (schedules, crossfade)")
    sw.add_argument("--hop", type=float, default=0.5, help="trace hop, seconds")
    sw.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (1 = off)")
    sw.add_argument("--top-k", type=int, default=250, help="sample among the k likeliest codes (0: all)")
    sw.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    sw.add_argument("--ray", default=None, metavar="auto|local|ADDRESS",
                    help="fan out over Ray: auto (the running cluster), local (start one here) or an address; "
                         "one GPU per worker where the cluster has GPUs")
    sw.add_argument("--workers", type=int, default=None, help="Ray workers (default: one per GPU, else per CPU)")
    sw.add_argument("--chunk", type=int, default=8,
                    help="samples per unit of work sent to a worker, generated together in one batched forward "
                         "(results do not depend on it)")
    sw.add_argument("--threads", type=int, default=None, help="torch threads where clips are generated")
    sw.add_argument("--save-audio", action="store_true", help="also write every clip to OUT/audio/")
    sw.add_argument("--quiet", action="store_true", help="no progress bars")
    sw.set_defaults(func=cmd_eval_sweep)
