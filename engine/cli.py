"""`musicrfm generate`, and the model options every command that loads a model shares (`add_model_args`).
Registered by musicrfm.main; heavy imports happen only when the command runs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_MODEL = "musicgen-mini"


def add_model_args(p: argparse.ArgumentParser, default: str | None = DEFAULT_MODEL, default_help: str = "") -> None:
    """--model, --device, --dtype. `default_help` says what a `default` of None means."""
    p.add_argument("--model", default=default,
                   help="musicgen-mini (bundled: trained here on SynTheory notes, chords and intervals), a Hugging "
                        "Face id (facebook/musicgen-small|medium|large), a local directory saved with "
                        "save_pretrained, or a random-weight model: tiny-random, random-small|medium|large "
                        f"(their audio is noise){f' (default: {default_help})' if default_help else ''}")
    p.add_argument("--device", default="auto", help="cuda, cuda:1, cpu, ... (default: cuda if present)")
    p.add_argument("--dtype", default="auto", help="float32|float16|bfloat16 (default: bf16/fp16 on CUDA, fp32 on CPU)")


def add_units_arg(p) -> None:
    """--units: what a strength (a coefficient, a knob, an --eta0 level) is measured in (engine.steering)."""
    p.add_argument("--units", choices=["relative", "raw"], default="relative",
                   help="strength units: relative = a fraction of each layer's typical activation norm (0.5: "
                        "an audible pull, 1: strong, on any model), raw = hidden-state units as in the paper "
                        "(its 0.15-0.6 are for MusicGen-large). Default: relative")


def add_bank_arg(p, help: str = "direction bank (.safetensors); repeatable (default: the bundled model's own "
                                "banks)") -> None:
    """`--bank FILE`, taken the same way by every command that steers: once per file, repeatable."""
    p.add_argument("--bank", action="append", type=Path, default=[], metavar="FILE", help=help)


def _add_generate_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--prompt", default="", help="text prompt (default: empty)")
    p.add_argument("--seconds", type=float, default=10.0, help="length of audio to generate, > 0 and at most a day "
                                                                "(86400)")
    p.add_argument("--out", type=Path, default=Path("out.wav"),
                   help="output WAV, in an existing folder; a .json sidecar is written beside it")
    p.add_argument("--from-sidecar", type=Path, metavar="JSON",
                   help="regenerate exactly from a sidecar written by an earlier run (other settings ignored) and "
                        "compare the tokens with it: exit 1, writing nothing, when they differ")
    s = p.add_argument_group("steering")
    add_bank_arg(s)
    s.add_argument("--steer", action="append", default=[], metavar="CONCEPT:CLASS=STRENGTH[@SCHEDULE]",
                   help="steer toward a direction at a strength (in --units), e.g. notes:C=0.5 or "
                        "notes:C=0.5@linear_rise:length=500; quality:minor=0.5 makes the chord on the root the "
                        "model holds minor (with a notes bank; hold the root with notes:X); repeatable")
    add_units_arg(s)
    s.add_argument("--crossfade", action="append", default=[], metavar="A,B=COEF[@start=S,length=N,curve=C]",
                   help="fade direction A out while B fades in, e.g. notes:C,notes:G=0.45@start=0,length=1500")
    s.add_argument("--schedule", default="constant",
                   help="the schedule of a --steer without its own: constant, linear_rise, linear_decay, "
                        "exp_decay, logistic, sine, keyframes, fade_in, fade_out (with :key=value,...)")
    s.add_argument("--gate", type=float, default=1.0, help="Bernoulli gate probability per step (paper's best: 0.3)")
    s.add_argument("--gate-seed", type=int, default=None,
                   help="seed of the gate's on/off draws (default: derived from --seed, so each seed gates its "
                        "own steps; the sidecar records the value used)")
    s.add_argument("--layers", default="exponential:kappa=0.95,w0=1",
                   help="layer weighting: all, topk:k=8, linear, exponential:kappa=0.95,w0=1, explicit:weights=..., "
                        "or chosen (only the layer the bank's `train --layer-choice clustering` chose)")
    s.add_argument("--rows", choices=["both", "cond"], default="both",
                   help="guidance rows to steer: both (paper) or the conditional row only")
    s.add_argument("--rule", choices=["add", "norm"], default="add",
                   help="update rule: add (paper) or norm-preserving (h + a|h|r)/(1+a)")
    s.add_argument("--site", choices=["residual", "attention"], default="residual",
                   help="injection point: residual stream after each block, or self-attention output")
    g = p.add_argument_group("sampling")
    g.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (1 = off)")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    g.add_argument("--top-k", type=int, default=250, help="sample among the k likeliest codes (0: all)")
    g.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling mass (0: off)")
    g.add_argument("--greedy", action="store_true", help="take the likeliest code instead of sampling")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    d = p.add_argument_group("decode loop")
    d.add_argument("--chunk-steps", type=int, default=50, help="steps per chunk (does not change the tokens)")
    d.add_argument("--context-seconds", type=float, default=None,
                   help="decoder context before re-prompting (default: the model's positions up to 30 s: 30 s "
                        "for the released models, 5.12 s for musicgen-mini)")
    d.add_argument("--keep-seconds", type=float, default=None,
                   help="audio kept as prompt when re-prompting (default: 20 s or two thirds of the context, "
                        "whichever is less: 3.4 s for musicgen-mini)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (the model's loading bars included)")


def _parse_spec(args):
    from .generation import default_gate_seed
    from .steering import DirectionControl, LayerWeighting, Schedule, SteeringSpec, crossfade

    controls = []
    for item in args.steer:
        head, _, sched = item.partition("@")
        key, eq, coef = head.rpartition("=")
        if not eq or ":" not in key:
            raise ValueError(f"--steer {item!r}: expected CONCEPT:CLASS=COEF[@SCHEDULE], e.g. notes:C=0.45")
        try:
            value = float(coef)
        except ValueError:
            raise ValueError(f"--steer {item!r}: coefficient {coef!r} is not a number") from None
        schedule = Schedule.parse(sched or args.schedule)
        controls.append(DirectionControl(key=key, coefficient=value, schedule=schedule))
    for item in args.crossfade:
        head, _, opts = item.partition("@")
        pair, eq, coef = head.rpartition("=")
        keys = pair.split(",")
        if not eq or len(keys) != 2:
            raise ValueError(f"--crossfade {item!r}: expected A,B=COEF[@start=S,length=N,curve=C]")
        kw = dict(kv.split("=", 1) for kv in opts.split(",") if kv) if opts else {}
        unknown = set(kw) - {"start", "length", "curve"}
        if unknown:
            raise ValueError(f"--crossfade {item!r}: unknown option(s) {sorted(unknown)}")
        controls.extend(crossfade(keys[0], keys[1], float(coef), start=int(kw.get("start", 0)),
                                  length=int(kw.get("length", 1500)), curve=kw.get("curve", "equal_power")))
    gate_seed = default_gate_seed(args.seed) if args.gate_seed is None else args.gate_seed
    # "chosen" needs the bank (its recorded layer): a placeholder here, resolved by _resolve_chosen_layers.
    layers = LayerWeighting() if args.layers.strip() == CHOSEN_LAYERS else LayerWeighting.parse(args.layers)
    return SteeringSpec(controls=tuple(controls), gate_p=args.gate, gate_seed=gate_seed,
                        layers=layers, rows=args.rows, rule=args.rule, site=args.site,
                        units=args.units)


CHOSEN_LAYERS = "chosen"  # --layers chosen: the bank's clustering-chosen layer alone


def _resolve_chosen_layers(spec, layers_arg: str, bank):
    """`spec` with --layers chosen made explicit: weight 1 at the bank's chosen layer, 0 elsewhere."""
    from dataclasses import replace

    from .steering import LayerWeighting

    if layers_arg.strip() != CHOSEN_LAYERS or not spec.controls:
        return spec
    return replace(spec, layers=LayerWeighting.single(bank.chosen_layer, bank.fingerprint.num_layers))


def _seconds_as_steps(option: str, value: float | None, rate: float, *, allow_zero: bool) -> int | None:
    """--context-seconds / --keep-seconds in steps (None: the engine's default): a number of seconds in
    [0, a day], and > 0 unless `allow_zero`."""
    from musicrfm.protocol import fields

    from .generation import MAX_GENERATE_SECONDS

    if value is None:
        return None
    value = fields.number(option, value, 0, MAX_GENERATE_SECONDS)
    if value == 0 and not allow_zero:
        raise ValueError(f"{option} must be > 0, got 0")
    return round(value * rate)


def cmd_generate(args) -> int:
    from musicrfm.protocol.wav import check_writable

    from .audio import write_wav
    from .model import bundled_banks, check_model_name, load_model
    from .generation import (check_seconds, generate, generate_from_sidecar, load_steering_banks,
                             write_sidecar)
    from .sampling import SamplingConfig

    # Everything a user can get wrong is checked before the model loads (seconds, not a generation later).
    sidecar = args.out.with_suffix(".json")
    if sidecar == args.out:
        raise ValueError(f"--out {args.out}: the sidecar goes to FILE.json, so --out must not end in .json")
    check_writable(args.out, "--out")
    check_writable(sidecar, "--out's sidecar")
    expected = None
    if args.from_sidecar:
        try:
            settings = json.loads(args.from_sidecar.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{args.from_sidecar} is not a JSON sidecar: {exc}") from None
        except RecursionError:  # the JSON reader recurses once per nested array or object
            raise ValueError(f"{args.from_sidecar}: arrays or objects nested too deeply") from None
        result = generate_from_sidecar(settings, progress=not args.quiet, where=str(args.from_sidecar))
        expected = settings.get("tokens_sha256")
    else:
        check_seconds(args.seconds, "--seconds")
        # checked now; turned into steps once the model's frame rate is known
        _seconds_as_steps("--context-seconds", args.context_seconds, 1.0, allow_zero=False)
        _seconds_as_steps("--keep-seconds", args.keep_seconds, 1.0, allow_zero=True)
        spec = _parse_spec(args)
        sampling = SamplingConfig(guidance_scale=args.guidance, temperature=args.temperature, top_k=args.top_k,
                                  top_p=args.top_p, greedy=args.greedy)
        check_model_name(args.model)
        # A bundled model brings its own banks: --steer notes:C=... works without --bank.
        banks = args.bank or (bundled_banks(args.model) if spec.controls else [])
        bank = load_steering_banks(spec, banks)  # every --steer key, against the banks
        spec = _resolve_chosen_layers(spec, args.layers, bank)
        model = load_model(args.model, device=args.device, dtype=args.dtype)
        print(f"model: {model.describe()}", file=sys.stderr)
        rate = model.frame_rate
        result = generate(
            model, args.prompt, args.seconds, spec=spec, bank_paths=banks, sampling=sampling, seed=args.seed,
            chunk_steps=args.chunk_steps,
            context_steps=_seconds_as_steps("--context-seconds", args.context_seconds, rate, allow_zero=False),
            keep_steps=_seconds_as_steps("--keep-seconds", args.keep_seconds, rate, allow_zero=True),
            progress=not args.quiet,
        )
    got = result.settings["tokens_sha256"]
    if args.from_sidecar:
        if not expected:
            print(f"nothing to compare: {args.from_sidecar} records no tokens_sha256")
        elif got == expected:
            print(f"tokens match the sidecar (sha256 {got[:16]}...)")
        else:
            print(f"musicrfm: tokens differ: the sidecar has sha256 {expected[:16]}..., this run {got[:16]}... "
                  f"(the same model, device and dtype are needed); not writing {args.out}", file=sys.stderr)
            return 1
    write_wav(args.out, result.audio, result.sample_rate)
    write_sidecar(sidecar, result.settings)
    note = f" [{result.settings['note']}]" if result.settings.get("note") else ""
    print(f"wrote {args.out} ({len(result.audio) / result.sample_rate:.2f} s) and {sidecar}{note}")
    return 0


def register(sub) -> None:
    gen = sub.add_parser("generate", help="generate audio (optionally steered) to a WAV file",
                         description="Generate audio with a MusicGen model, optionally steered toward concept "
                                     "directions, into a WAV file and a .json sidecar that regenerates it.")
    _add_generate_args(gen)
    gen.set_defaults(func=cmd_generate)
