"""`musicrfm data | extract | train | report`: audio -> features -> probes -> direction banks, one command per stage."""

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
    from musicrfm.engine.model import load_model

    from .dataset import load_audio, load_concept
    from .extract import ExtractionSettings, extract_concept

    model = load_model(args.model, device=args.device, dtype=args.dtype)
    print(f"model: {model.describe()}", file=sys.stderr)
    settings = ExtractionSettings(prompt=args.prompt, batch_size=args.batch_size, shard_size=args.shard_size,
                                  layers=tuple(_layer_list(args.layers)) if args.layers else None, site=args.site)
    for concept in args.concepts.split(","):
        data = load_concept(args.data, concept)
        folder = extract_concept(model, concept, data.paths, data.labels, args.out, settings=settings,
                                 targets=data.targets, classes=data.classes, load_audio=load_audio,
                                 progress=not args.quiet)
        print(f"{concept}: {settings.site} features of {len(data.paths)} clips in {folder}")
    return 0


def cmd_train(args) -> int:
    from .train import TrainSettings, train_concept

    settings = TrainSettings(method=args.method, pooling=args.pooling, trials=args.trials, seed=args.seed,
                             layers=_layer_list(args.layers), device=args.device,
                             layer_choice=args.layer_choice, invariant_to=args.invariant_to,
                             data=str(args.data) if args.data else None, rfm_metric=args.rfm_metric)
    for concept in args.concepts.split(","):
        result = train_concept(Path(args.features) / concept, args.out, settings, progress=not args.quiet)
        print(result.summary())
    return 0


def cmd_report(args) -> int:
    from .classification import classification_report

    rows = classification_report(args.features, args.concepts.split(","), args.out, trials=args.trials,
                                 seed=args.seed, layers=_layer_list(args.layers), components=args.components,
                                 progress=not args.quiet)
    for r in rows:
        layer = "all" if r.best_layer is None else r.best_layer
        auc = "" if r.val_auc != r.val_auc else f", val AUC {r.val_auc:.3f}"  # NaN for R^2 rows
        print(f"{r.concept:<20} {r.probe:<30} {r.metric} test {r.test:.3f} (val {r.val:.3f}{auc}, layer {layer})")
    print(f"wrote {Path(args.out) / 'classification.csv'} and classification.png")
    return 0


def cmd_norms(args) -> int:
    from musicrfm.engine.bank import DirectionBank

    from .extract import load_features, load_layer_norms

    bank = DirectionBank.load(args.bank)
    n = bank.fingerprint.num_layers
    if args.features:
        norms = None
        for folder in args.features:
            site = load_features(folder, poolings=[]).site
            if site != bank.injection_point:
                raise ValueError(f"{folder}: features read at the {site} site, the bank steers at the "
                                 f"{bank.injection_point} site; their norms would not match")
            found = load_layer_norms(folder, n)
            if found is None:
                raise ValueError(f"{folder}: the features do not cover all {n} layers or predate the norm statistics "
                                 "(extract again, or leave out --features to measure with the model)")
            norms = found if norms is None else norms.combined(found)
    else:
        from musicrfm.engine.model import load_model
        from musicrfm.engine.norms import measure_layer_norms

        model = load_model(args.model, device=args.device, dtype=args.dtype)
        bank.check_compatible(model.fingerprint)
        norms = measure_layer_norms(model, bank.injection_point)
    out = args.out or args.bank
    bank.with_layer_norms(norms).save(out)
    shown = ", ".join(f"{m:.4g}" for m in norms.mean)
    print(f"wrote {out}: typical |h| per layer {shown} ({norms.source})")
    return 0


def register(sub) -> None:
    from musicrfm.engine.cli import add_model_args

    data = sub.add_parser("data", help="render training data")
    data_sub = data.add_subparsers(dest="dataset", required=True)
    syn = data_sub.add_parser("syntheory", help="render the SynTheory concepts from MIDI with a GM soundfont")
    syn.add_argument("--out", type=Path, default=Path("data/syntheory"), help="data set root (<concept>/info.csv)")
    syn.add_argument("--preset", choices=["quick", "full"], default="quick",
                     help="quick: every class, a few instruments (minutes); full: the original sizes")
    syn.add_argument("--concepts", default="", help="comma-separated (default: all 7)")
    syn.add_argument("--seed", type=int, default=0, help="rendering seed (instruments, voicings)")
    syn.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    syn.add_argument("--soundfont", type=Path, default=None,
                     help="a .sf2 file (default: TimGM6mb from Debian's timgm6mb-soundfont)")
    syn.add_argument("--quiet", action="store_true", help="no progress bar")
    syn.set_defaults(func=cmd_data)

    ext = sub.add_parser("extract", help="per-layer MusicGen features of a data set's clips")
    add_model_args(ext)
    ext.add_argument("--data", type=Path, default=Path("data/syntheory"), help="data set root (<concept>/info.csv)")
    ext.add_argument("--concepts", default="notes", help="comma-separated concepts")
    ext.add_argument("--out", type=Path, default=Path("features"), help="features root (<concept>/ shards)")
    ext.add_argument("--prompt", default="", help="text conditioning (default: empty, as the paper)")
    ext.add_argument("--layers", default=None, help="only these layers, e.g. 0-11 (default: all)")
    ext.add_argument("--site", choices=["residual", "attention"], default="residual",
                     help="injection point read: the residual stream after each block (MusicRFM) or the "
                          "self-attention output (the linear-probe method); a bank trained on it steers there")
    ext.add_argument("--batch-size", type=int, default=8, help="clips per forward pass")
    ext.add_argument("--shard-size", type=int, default=256, help="clips per feature shard (the unit of resuming)")
    ext.add_argument("--quiet", action="store_true", help="no progress bars")
    ext.set_defaults(func=cmd_extract)

    tr = sub.add_parser("train", help="train per-layer probes and write a direction bank",
                        description="Train one-vs-rest probes per layer on `musicrfm extract` features and write "
                                    "OUT/<concept>.<method>.safetensors with a per-layer score CSV and plot.")
    tr.add_argument("--features", type=Path, default=Path("features"), help="`musicrfm extract` output (<concept>/)")
    tr.add_argument("--concepts", default="notes", help="comma-separated concepts")
    tr.add_argument("--out", type=Path, default=Path("banks"), help="where the banks are written")
    tr.add_argument("--method", choices=["rfm", "linear", "diffmeans"], default="rfm",
                    help="rfm (Recursive Feature Machine), linear (ridge/MSE probe) or diffmeans (difference of means)")
    tr.add_argument("--pooling", choices=["mean", "last"], default="mean",
                    help="features pooled over time (mean) or at the last position")
    tr.add_argument("--rfm-metric", choices=["shared", "per-class"], default="shared",
                    help="RFM: one M per layer learned from all classes (shared, default) or one binary RFM per "
                         "class with its own M (per-class, the paper's; ~classes x slower); writes "
                         "<concept>.rfm.per-class.*")
    tr.add_argument("--trials", type=int, default=None, help="hyper-parameter search budget (default: the search's own)")
    tr.add_argument("--layers", default=None, help="only these layers, e.g. 0-11 (shard training over machines; "
                                                   "default: all)")
    tr.add_argument("--seed", type=int, default=0, help="split and search seed")
    tr.add_argument("--layer-choice", choices=["none", "clustering"], default="none",
                    help="clustering: per layer, k-means (k = classes) on the training features scored by ARI and "
                         "NMI against the labels; the best ARI is the bank's chosen layer (steer it with "
                         "--layers chosen), both indices in the scores CSV")
    tr.add_argument("--invariant-to", default=None, metavar="COLUMN",
                    help="an info.csv column the directions must not encode, e.g. root_note_name for chord quality "
                         "without the root: balance (class, value) cells and project the span of the per-value "
                         "feature means out before fitting (needs --data)")
    tr.add_argument("--data", type=Path, default=None, help="the data set root (<concept>/info.csv) the features were "
                                                            "extracted from; read with --invariant-to")
    tr.add_argument("--device", default="auto", help="where probes are fitted (default: cuda if present)")
    tr.add_argument("--quiet", action="store_true", help="no progress bars")
    tr.set_defaults(func=cmd_train)

    rep = sub.add_parser("report", help="classification report (paper's Table 1 protocol) from features",
                         description="RFM on mean-pooled features with one shared M and with a per-class M (the "
                                     "paper's binary probes), the paper's aggregated multi-layer RFM, RFM on the last "
                                     "position and a linear probe: best layer by validation, validation AUC, accuracy "
                                     "(R^2 for tempo) on the held-out test split; OUT/classification.csv and .png.")
    rep.add_argument("--features", type=Path, default=Path("features"), help="`musicrfm extract` output (<concept>/)")
    rep.add_argument("--concepts", default="notes", help="comma-separated concepts")
    rep.add_argument("--out", type=Path, default=Path("reports"), help="where the CSV and plot are written")
    rep.add_argument("--trials", type=int, default=None, help="RFM search trials per layer (default: the search's own)")
    rep.add_argument("--layers", default=None, help="only these layers (default: all extracted)")
    rep.add_argument("--seed", type=int, default=0, help="split and search seed")
    rep.add_argument("--components", type=int, default=8,
                     help="top AGOP eigenvectors per layer fed to the aggregated (multi-layer) probe")
    rep.add_argument("--quiet", action="store_true", help="no progress bars")
    rep.set_defaults(func=cmd_report)

    nm = sub.add_parser("norms", help="give a direction bank its layers' typical activation norms (relative strength "
                                      "reads them; banks trained before they were recorded lack them)")
    add_model_args(nm)
    nm.add_argument("bank", type=Path, help="the bank (.safetensors)")
    nm.add_argument("--features", type=Path, action="append", default=[], metavar="DIR",
                    help="`musicrfm extract` output of a concept (DIR/<concept>); repeatable; default: measure with "
                         "--model (short unsteered generations)")
    nm.add_argument("--out", type=Path, default=None, help="write here (default: the bank itself)")
    nm.set_defaults(func=cmd_norms)
