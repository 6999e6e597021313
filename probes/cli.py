"""`musicrfm data | extract | train | report | eval`: the offline pipeline, one command per stage."""

from __future__ import annotations

import sys
from pathlib import Path


def _layer_list(text: str | None) -> list[int] | None:
    """'0-11,20,47' -> [0..11, 20, 47]."""
    if not text:
        return None
    out: list[int] = []
    for part in text.split(","):
        lo, dash, hi = part.strip().partition("-")
        try:
            out.extend(range(int(lo), int(hi) + 1) if dash else [int(lo)])
        except ValueError:
            raise ValueError(f"--layers {text!r}: expected numbers and ranges like 0-11,20") from None
    return sorted(set(out))


def cmd_data(args) -> int:
    from .syntheory import CONCEPTS, render_dataset

    concepts = tuple(args.concepts.split(",")) if args.concepts else CONCEPTS
    unknown = [c for c in concepts if c not in CONCEPTS]
    if unknown:
        raise ValueError(f"unknown concept(s) {unknown}; choose from {', '.join(CONCEPTS)}")
    kwargs = {"soundfont": args.soundfont} if args.soundfont else {}
    counts = render_dataset(args.out, concepts=concepts, preset=args.preset, seed=args.seed, workers=args.workers,
                            progress=not args.quiet, **kwargs)
    for concept, n in counts.items():
        print(f"{concept}: {n} clips in {Path(args.out) / concept}")
    return 0


def cmd_extract(args) -> int:
    from engine.model import load_model

    from .dataset import load_audio, load_concept
    from .extract import ExtractionSettings, extract_concept

    model = load_model(args.model, device=args.device, dtype=args.dtype)
    print(f"model: {model.describe()}", file=sys.stderr)
    settings = ExtractionSettings(prompt=args.prompt, batch_size=args.batch_size, shard_size=args.shard_size,
                                  layers=tuple(_layer_list(args.layers)) if args.layers else None)
    for concept in args.concepts.split(","):
        data = load_concept(args.data, concept)
        folder = extract_concept(model, concept, data.paths, data.labels, args.out, settings=settings,
                                 targets=data.targets, classes=data.classes, load_audio=load_audio,
                                 progress=not args.quiet)
        print(f"{concept}: features of {len(data.paths)} clips in {folder}")
    return 0


def cmd_train(args) -> int:
    from .train import TrainSettings, train_concept

    settings = TrainSettings(method=args.method, pooling=args.pooling, trials=args.trials, seed=args.seed,
                             layers=_layer_list(args.layers), device=args.device)
    for concept in args.concepts.split(","):
        result = train_concept(Path(args.features) / concept, args.out, settings, progress=not args.quiet)
        print(result.summary())
    return 0


def cmd_report(args) -> int:
    from .report import classification_report

    rows = classification_report(args.features, args.concepts.split(","), args.out, trials=args.trials,
                                 seed=args.seed, layers=_layer_list(args.layers), progress=not args.quiet)
    for r in rows:
        print(f"{r.concept:<20} {r.probe:<28} {r.metric} test {r.test:.3f} (val {r.val:.3f}, layer {r.best_layer})")
    print(f"wrote {Path(args.out) / 'classification.csv'} and classification.png")
    return 0


def _floats(text: str | None, what: str) -> tuple[float, ...] | None:
    if not text:
        return None
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{what} {text!r}: expected comma-separated numbers, e.g. 0.15,0.3") from None


def cmd_eval_sweep(args) -> int:
    from engine.sampling import SamplingConfig

    from engine.model import bundled_banks, bundled_prompts

    from .sweep import NOISE_LABEL, PAPER, SweepSettings, run_sweep

    prompts = tuple(p.strip() for p in args.prompts.split(",") if p.strip()) if args.prompts else ()
    if args.prompts_file:
        prompts += tuple(line.strip() for line in args.prompts_file.read_text().splitlines() if line.strip())
    prompts = prompts or bundled_prompts(args.model)
    banks = args.bank or bundled_banks(args.model)
    settings = SweepSettings(
        preset=args.preset, banks=tuple(str(b) for b in banks), out=str(args.out), model=args.model,
        concepts=tuple(c.strip() for c in args.concept.split(",") if c.strip()),
        **({"prompts": prompts} if prompts else {}), samples=args.samples, seconds=args.seconds, seed=args.seed,
        eta0=_floats(args.eta0, "--eta0"),
        device=None if args.device == "auto" else args.device, dtype=None if args.dtype == "auto" else args.dtype,
        sampling=SamplingConfig(guidance_scale=args.guidance, top_k=args.top_k, temperature=args.temperature),
        features=str(args.features) if args.features else None, clap=args.clap, probe_layer=args.probe_layer,
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
    from engine.cli import add_model_args

    data = sub.add_parser("data", help="render training data")
    data_sub = data.add_subparsers(dest="dataset", required=True)
    syn = data_sub.add_parser("syntheory", help="render the SynTheory concepts from MIDI with a GM soundfont")
    syn.add_argument("--out", type=Path, default=Path("data/syntheory"))
    syn.add_argument("--preset", choices=["quick", "full"], default="quick",
                     help="quick: every class, a few instruments (minutes); full: the original sizes")
    syn.add_argument("--concepts", default="", help="comma-separated (default: all 7)")
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    syn.add_argument("--soundfont", type=Path, default=None,
                     help="a .sf2 file (default: TimGM6mb from Debian's timgm6mb-soundfont)")
    syn.add_argument("--quiet", action="store_true")
    syn.set_defaults(func=cmd_data)

    ext = sub.add_parser("extract", help="per-layer MusicGen features of a data set's clips")
    add_model_args(ext)
    ext.add_argument("--data", type=Path, default=Path("data/syntheory"), help="data set root (<concept>/info.csv)")
    ext.add_argument("--concepts", default="notes", help="comma-separated concepts")
    ext.add_argument("--out", type=Path, default=Path("features"))
    ext.add_argument("--prompt", default="", help="text conditioning (default: empty, as the paper)")
    ext.add_argument("--layers", default=None, help="only these layers, e.g. 0-11 (default: all)")
    ext.add_argument("--batch-size", type=int, default=8)
    ext.add_argument("--shard-size", type=int, default=256)
    ext.add_argument("--quiet", action="store_true")
    ext.set_defaults(func=cmd_extract)

    tr = sub.add_parser("train", help="train per-layer probes and write a direction bank")
    tr.add_argument("--features", type=Path, default=Path("features"))
    tr.add_argument("--concepts", default="notes")
    tr.add_argument("--out", type=Path, default=Path("banks"))
    tr.add_argument("--method", choices=["rfm", "linear", "diffmeans"], default="rfm")
    tr.add_argument("--pooling", choices=["mean", "last"], default="mean")
    tr.add_argument("--trials", type=int, default=None, help="hyper-parameter search budget (default: the search's own)")
    tr.add_argument("--layers", default=None, help="only these layers (shard training over machines)")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--device", default="auto")
    tr.add_argument("--quiet", action="store_true")
    tr.set_defaults(func=cmd_train)

    rep = sub.add_parser("report", help="classification report (paper's Table 1 protocol) from features")
    rep.add_argument("--features", type=Path, default=Path("features"))
    rep.add_argument("--concepts", default="notes")
    rep.add_argument("--out", type=Path, default=Path("reports"))
    rep.add_argument("--trials", type=int, default=None, help="RFM search trials per layer")
    rep.add_argument("--layers", default=None, help="only these layers (default: all extracted)")
    rep.add_argument("--seed", type=int, default=0)
    rep.add_argument("--quiet", action="store_true")
    rep.set_defaults(func=cmd_report)

    ev = sub.add_parser("eval", help="evaluate steering: sweeps that follow the paper's protocols")
    ev_sub = ev.add_subparsers(dest="evaluation", required=True)
    sw = ev_sub.add_parser("sweep", help="generate steered and reference clips over a preset and measure them "
                                         "(FD, MMD², CLAP, checks, probe accuracy); resumable; --ray to fan out")
    add_model_args(sw)
    sw.add_argument("--preset", required=True, choices=["eta", "pairs", "schedules", "crossfade", "layers", "topk", "gate"],
                    help="eta: Table 2 / Fig. 2; pairs: Table 5; schedules: Table 6 / Fig. 1a; crossfade: Sec. 6.2 / "
                         "Fig. 1b; layers: Table 8; topk: Table 9; gate: Table 10")
    sw.add_argument("--bank", action="extend", nargs="+", default=[], metavar="FILE",
                    help="direction bank(s) holding the concepts (repeatable; default: a bundled model's own banks)")
    sw.add_argument("--concept", default="notes", help="comma-separated concepts to steer (pairs: two or more)")
    sw.add_argument("--prompts", default=None, help='comma-separated text prompts, cycled over samples '
                                                    "(default: a bundled model's example prompts, else four "
                                                    "generic music prompts)")
    sw.add_argument("--prompts-file", type=Path, default=None, help="more prompts, one per line (commas allowed)")
    sw.add_argument("--samples", type=int, default=8, help="clips per configuration (and in the reference set)")
    sw.add_argument("--seconds", type=float, default=10.0, help="length of each clip")
    sw.add_argument("--seed", type=int, default=0, help="sweep seed: each sample's seed derives from it and the index")
    sw.add_argument("--eta0", default=None, help="eta: the levels (default 0.15,0.3,0.45,0.6); pairs: the levels "
                                                 "(default 0.3,0.6); others: one value (default 0.45)")
    sw.add_argument("--out", type=Path, required=True, help="output directory (a rerun resumes it)")
    sw.add_argument("--features", type=Path, default=None,
                    help="`musicrfm extract` output (DIR/<concept>/): fit the multiclass probe and report probe accuracy")
    sw.add_argument("--probe-layer", type=int, default=None, help="probe at this layer (default: best by validation)")
    sw.add_argument("--probe-trials", type=int, default=None, help="RFM search trials for the probe (default: 100)")
    sw.add_argument("--probe-seed", type=int, default=0, help="split / search seed (as `musicrfm train --seed`)")
    sw.add_argument("--probe-device", default="auto", help="where the probe is fitted (default: cuda if present)")
    sw.add_argument("--clap", default=None, metavar="MODEL",
                    help="CLAP weights (HF id in the local cache or a directory): CLAP embedding for FD/MMD and "
                         "CLAP score; without it FD/MMD use logmel-stats-v1 and CLAP is 'unavailable'")
    sw.add_argument("--window", type=float, default=1.0, help="trace window, seconds (schedules, crossfade)")
    sw.add_argument("--hop", type=float, default=0.5, help="trace hop, seconds")
    sw.add_argument("--guidance", type=float, default=3.0)
    sw.add_argument("--top-k", type=int, default=250)
    sw.add_argument("--temperature", type=float, default=1.0)
    sw.add_argument("--ray", default=None, metavar="auto|local|ADDRESS",
                    help="fan out over Ray: auto (the running cluster), local (start one here) or an address; "
                         "one GPU per worker where the cluster has GPUs")
    sw.add_argument("--workers", type=int, default=None, help="Ray workers (default: one per GPU, else per CPU)")
    sw.add_argument("--chunk", type=int, default=4, help="samples per unit of work sent to a worker")
    sw.add_argument("--threads", type=int, default=None, help="torch threads where clips are generated")
    sw.add_argument("--save-audio", action="store_true", help="also write every clip to OUT/audio/")
    sw.add_argument("--quiet", action="store_true")
    sw.set_defaults(func=cmd_eval_sweep)
