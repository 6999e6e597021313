"""`musicrfm mini corpus | codec | lm | export | check`: train musicgen-mini, stage by stage.

Every stage resumes where it stopped (run it again with more --minutes or a larger --steps), so the
CPU-hours can be spread over sessions. docs/musicgen-mini.md has the recipe and what it measured.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict
from pathlib import Path

DEFAULT_WORK = Path("work/mini")


def _budget(args) -> dict:
    if args.minutes is None and args.steps is None:
        raise ValueError("give --minutes (this run's training time) or --steps (the total to reach)")
    return {"minutes": args.minutes, "steps": args.steps}


def cmd_corpus(args) -> int:
    from .corpus import CorpusSettings, render_corpus

    corpus = render_corpus(args.work / "corpus", CorpusSettings(seed=args.seed), workers=args.workers,
                           progress=not args.quiet)
    held = len(corpus.indices(validation=True))
    print(f"corpus: {len(corpus.clips)} clips ({held} held out) at {corpus.settings.sample_rate} Hz in {corpus.folder}")
    return 0


def _load_codec(work: Path):
    from .codec import CodecSettings, build_codec
    from .training import load_checkpoint

    folder = work / "codec" / "checkpoint"
    state = json.loads((folder / "state.json").read_text()) if (folder / "state.json").is_file() else None
    if state is None:
        raise FileNotFoundError(f"no trained codec in {folder}: run `musicrfm mini codec --work {work}` first")
    s = CodecSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in state["settings"].items()})
    codec = build_codec(s)
    load_checkpoint(folder, codec, None)
    return codec.eval(), state


def cmd_codec(args) -> int:
    from .codec import CodecSettings, train_codec
    from .corpus import load_corpus

    budget = _budget(args)  # before the corpus (1.2 GB) is read
    state = train_codec(load_corpus(args.work / "corpus"), args.work / "codec", CodecSettings(seed=args.seed),
                        eval_every=args.eval_every, threads=args.threads, progress=not args.quiet, **budget)
    last = state["evals"][-1]
    print(f"codec: step {state['step']}, {state['seconds'] / 3600:.2f} CPU-h; pitch agreement "
          f"{last['agreement']:.2f} on {last['clips']} held-out clips (originals {last['originals']:.2f})")
    return 0


def _codes(work: Path, corpus, codec, progress: bool):
    import numpy as np

    from .lm import encode_corpus

    path = work / "lm" / "codes.npy"
    if path.is_file():
        return np.load(path)
    codes = encode_corpus(codec, corpus, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, codes)
    return codes


def cmd_lm(args) -> int:
    from .corpus import load_corpus
    from .lm import LMSettings, train_lm

    budget = _budget(args)
    corpus = load_corpus(args.work / "corpus")
    codec, _ = _load_codec(args.work)
    codes = _codes(args.work, corpus, codec, not args.quiet)
    out = train_lm(corpus, codec, codes, args.work / "lm", LMSettings(seed=args.seed), total_steps=args.total_steps,
                   eval_every=args.eval_every, threads=args.threads, progress=not args.quiet, **budget)
    last = out["state"]["evals"][-1]
    print(f"lm: step {last['step']}, {last['seconds'] / 3600:.2f} CPU-h; held-out loss {last['held_out_loss']}")
    return 0


def cmd_export(args) -> int:
    import torch

    from .health import CAPTIONS
    from .corpus import load_corpus
    from .lm import LMSettings, build_mini, build_tokenizer, export_mini
    from .training import load_checkpoint
    from musicrfm.engine.model import bundled_model_folder

    corpus = load_corpus(args.work / "corpus")
    codec, codec_state = _load_codec(args.work)
    lm_folder = args.work / "lm" / "checkpoint"
    if not (lm_folder / "state.json").is_file():
        raise FileNotFoundError(f"no trained language model in {lm_folder}: run `musicrfm mini lm --work {args.work}`")
    lm_state = json.loads((lm_folder / "state.json").read_text())
    s = LMSettings(**lm_state["settings"])
    tokenizer = build_tokenizer([c.caption for c in corpus.clips])
    model = build_mini(codec, tokenizer, s)
    load_checkpoint(lm_folder, model, None)
    recipe = {
        "name": "musicgen-mini",
        "what": "a small MusicGen (EnCodec-architecture codec, T5-architecture text encoder, MusicGen decoder) "
                "trained by `musicrfm mini` on SynTheory notes, chords and intervals rendered with TimGM6mb",
        "corpus": {**asdict(corpus.settings), "clips": len(corpus.clips),
                   "held_out": len(corpus.indices(validation=True))},
        "codec": {"settings": codec_state["settings"], "steps": codec_state["step"],
                  "cpu_hours": round(codec_state["seconds"] / 3600, 3), "evals": codec_state["evals"][-3:]},
        "lm": {"settings": lm_state["settings"], "steps": lm_state["step"], "total_steps": lm_state["total_steps"],
               "cpu_hours": round(lm_state["seconds"] / 3600, 3), "evals": lm_state["evals"][-3:]},
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "commands": ["musicrfm mini corpus", "musicrfm mini codec", "musicrfm mini lm", "musicrfm mini export"],
        "example_prompts": list(CAPTIONS),
    }
    out = args.out or bundled_model_folder("musicgen-mini")
    size = export_mini(model, tokenizer, out, recipe)
    # The model's typical activation norms at each injection point, for banks that carry none (relative strength):
    # measured on the exported model itself, as it will run.
    from musicrfm.engine.decoder import INJECTION_POINTS
    from musicrfm.engine.model import load_model
    from musicrfm.engine.norms import measure_layer_norms

    exported = load_model(str(out), device="cpu", dtype="float32")
    recipe["layer_norms"] = {site: measure_layer_norms(exported, site, prompts=CAPTIONS[:4]).to_dict()
                             for site in INJECTION_POINTS}
    (Path(out) / "recipe.json").write_text(json.dumps(recipe, indent=1) + "\n")
    print(f"exported musicgen-mini to {out}: {size / 1e6:.1f} MB")
    return 0


def cmd_check(args) -> int:
    from musicrfm.engine.model import load_model

    from .health import activation_scale, check_codec, check_generation

    model = load_model(args.model, device="cpu", dtype="float32")
    result = {"model": model.describe()}
    result["codec"] = check_codec(model, clips=args.clips, seed=args.seed, progress=not args.quiet)
    print(json.dumps({"codec": result["codec"]}, indent=1), flush=True)
    result["residual_norm_per_layer"] = activation_scale(model, seed=args.seed)
    print(json.dumps({"residual_norm_per_layer": result["residual_norm_per_layer"]}), flush=True)
    result["generation"] = check_generation(model, samples=args.samples, seconds=args.seconds, seed=args.seed,
                                            progress=not args.quiet)
    print(json.dumps({"generation": result["generation"]}, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


def register(sub) -> None:
    mini = sub.add_parser("mini", help="train musicgen-mini, the small offline model (docs/musicgen-mini.md)")
    stages = mini.add_subparsers(dest="stage", required=True)

    def stage(name: str, help: str, func, budget: bool = False):
        p = stages.add_parser(name, help=help)
        p.add_argument("--work", type=Path, default=DEFAULT_WORK, help=f"working folder (default: {DEFAULT_WORK})")
        p.add_argument("--seed", type=int, default=0, help="seed of this stage")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        if budget:
            p.add_argument("--minutes", type=float, default=None, help="training time for this run")
            p.add_argument("--steps", type=int, default=None, help="total steps to reach")
            p.add_argument("--eval-every", type=float, default=10.0, help="minutes between checkpoints")
            p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
        p.set_defaults(func=func)
        return p

    c = stage("corpus", "render the training corpus (notes, chords, intervals; ~2.5 min on 2 cores)", cmd_corpus)
    c.add_argument("--workers", type=int, default=2, help="rendering processes")
    stage("codec", "train the codec (resumable)", cmd_codec, budget=True)
    lm = stage("lm", "train the text encoder and decoder on the codec's tokens (resumable)", cmd_lm, budget=True)
    lm.add_argument("--total-steps", type=int, default=20_000, help="length of the learning-rate schedule")
    e = stage("export", "assemble the model and write it (fp16 safetensors) with its recipe", cmd_export)
    e.add_argument("--out", type=Path, default=None,
                   help="where to write the model (default: the bundled model's folder in engine/weights)")
    k = stages.add_parser("check", help="codec pitch agreement on fresh renders; dominant pitch of generated clips")
    k.add_argument("--model", default="musicgen-mini", help="the model to check (bundled or a directory)")
    k.add_argument("--clips", type=int, default=60, help="fresh renders for the codec's pitch agreement")
    k.add_argument("--samples", type=int, default=24, help="generated clips for the dominant-pitch check")
    k.add_argument("--seconds", type=float, default=4.0, help="length of each generated clip")
    k.add_argument("--seed", type=int, default=1, help="seed of the renders and the generation")
    k.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    k.add_argument("--quiet", action="store_true", help="no progress bars")
    k.set_defaults(func=cmd_check)
