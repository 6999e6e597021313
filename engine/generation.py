"""Offline generation: run the decode loop for a fixed length, decode audio as a stream, describe it all.

The sidecar (`Generation.settings`) holds every setting that decides the tokens, so `generate_from_sidecar`
regenerates them exactly (same model, device and dtype); `tokens_sha256` lets anyone check that.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from .audio import push_together, streaming_decoder
from .bank import DirectionBank, LayerNorms
from .loop import MIN_ROWS, Engine, Generator
from .norms import with_layer_norms
from .model import NOISE_WARNING, MusicModel, load_model
from .sampling import SamplingConfig
from .steering import SteeringPlan, SteeringSpec, check_control_key, legacy_spec

from musicrfm.protocol import fields

SIDECAR_FORMAT = "musicrfm.render"
# 2: steering strength has units ("relative" by default) and the layer weighting a margin; version 1 sidecars
# were raw units and exact min-max, and are read as such.
SIDECAR_VERSION = 2
# The longest generation `generate` runs: a day of audio (1e308 seconds is a typo, not a request).
MAX_GENERATE_SECONDS = 24 * 3600
# Keys a sidecar must hold to regenerate its tokens, and the string-valued ones among them.
_SIDECAR_KEYS = ("model", "device", "dtype", "banks", "prompt", "seconds", "seed", "sampling", "steering",
                 "chunk_steps", "context_steps", "keep_steps")
_SIDECAR_STRINGS = ("model", "device", "dtype", "prompt")


def check_seconds(seconds: Any, where: str = "seconds") -> float:
    """A generation's length: a positive number of seconds, at most MAX_GENERATE_SECONDS."""
    value = fields.number(where, seconds)
    if not 0 < value <= MAX_GENERATE_SECONDS:
        raise ValueError(f"{where} must be > 0 and at most {MAX_GENERATE_SECONDS} (a day), got {value:g}")
    return value


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tokens_sha256(codes: torch.Tensor) -> str:
    return hashlib.sha256(codes.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def provenance(model: MusicModel, bank_paths: Sequence[str | Path], bank: DirectionBank | None = None) -> dict:
    """What made a file's tokens, as a generation sidecar and a recording log's header both record it
    (docs/formats.md): the model, its fingerprint, whether its weights are random, device and dtype, each
    bank with its hash (so a later run can refuse a bank that changed: `check_bank_hashes`), and the layer
    norms relative strength was measured against (a bank without its own gets the same ones on replay)."""
    norms = bank.layer_norms.to_dict() if bank is not None and bank.layer_norms is not None else None
    return {
        "model": model.name,
        "model_fingerprint": model.fingerprint.to_dict(),
        "random_weights": model.is_random,
        "device": model.device.type,
        "dtype": str(model.dtype).replace("torch.", ""),
        "banks": [{"path": str(p), "sha256": file_sha256(p)} for p in bank_paths],
        "layer_norms": norms,
    }


def check_bank_entries(where: str, value: Any, *, error: type[Exception] = ValueError) -> list[dict]:
    """The `banks` of a provenance as read back from a file (sidecar or recording log): a list of
    {"path", "sha256"} strings; `error` naming `where` otherwise."""
    if not isinstance(value, list):
        raise error(f"{where} must be a list of {{path, sha256}}, got {fields.shown(value)}")
    for i, b in enumerate(value):
        fields.fields(f"{where}[{i}]", b, ("path", "sha256"), error=error)
        for key in ("path", "sha256"):
            if not isinstance(b.get(key), str):
                raise error(f"{where}[{i}].{key} must be a string, got {fields.shown(b.get(key))}")
    return value


def check_bank_hashes(entries: list[dict], source: str, since: str) -> None:
    """Banks named by a sidecar or log ({"path", "sha256"} each) must exist and be unchanged: the same
    settings with another bank would silently steer elsewhere."""
    for b in entries:
        if not Path(b["path"]).is_file():
            raise FileNotFoundError(f"direction bank {b['path']} named in the {source} is missing")
        if file_sha256(b["path"]) != b["sha256"]:
            raise ValueError(f"direction bank {b['path']} changed since the {since} (sha256 differs)")


def load_banks(paths: list[str | Path]) -> DirectionBank | None:
    """Load and merge direction banks (each may hold several concepts)."""
    bank = None
    for p in paths:
        b = DirectionBank.load(p)
        bank = b if bank is None else bank.merge(b)
    return bank


def load_steering_banks(spec: SteeringSpec | None, bank_paths: Sequence[str | Path]) -> DirectionBank | None:
    """The banks a run steers with, loaded and checked against its spec: every direction it names (an
    unknown one is an UnknownDirectionError that offers the bank's close keys) and the injection site.
    Banks load in milliseconds and a model in seconds, so commands call this before loading the model; the
    bank's shape is checked against the model when the plan compiles."""
    bank = load_banks(list(bank_paths))
    if spec is None or not spec.controls:
        return bank
    if bank is None:
        raise ValueError("steering needs at least one direction bank (--bank FILE)")
    for control in spec.controls:
        check_control_key(bank, control.key)  # UnknownDirectionError names the key and its close matches
    if bank.injection_point != spec.site:
        raise ValueError(f"the bank's directions were read at the {bank.injection_point!r} injection point, but "
                         f"steering is set to site {spec.site!r}")
    return bank


def default_gate_seed(seed: int) -> int:
    """The gate seed of a run that names none: the first 6 bytes (little-endian) of
    sha256("musicrfm gate seed <seed>"). A pure function of the sampling seed, so a run reproduces from its
    seed, but not the seed itself and different for every seed: two renders at the same gate p gate
    different steps (one fixed default would give every render one on/off pattern). 48 bits: exact in any
    JSON reader, a TOML score and the live protocol, should someone copy it from a sidecar."""
    seed = fields.whole("seed", seed, 0)
    return int.from_bytes(hashlib.sha256(f"musicrfm gate seed {seed}".encode()).digest()[:6], "little")


@dataclass
class Generation:
    audio: np.ndarray  # float32 mono in [-1, 1]
    sample_rate: int
    codes: torch.Tensor  # [K, frames]
    settings: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Render:
    """One clip of a batch made by `generate_many`: what may differ between clips made together."""

    prompt: str
    seed: int = 0
    spec: SteeringSpec | None = None
    bank_paths: tuple[str | Path, ...] = ()


def generate(
    model: MusicModel,
    prompt: str,
    seconds: float,
    *,
    spec: SteeringSpec | None = None,
    bank_paths: Sequence[str | Path] = (),
    sampling: SamplingConfig = SamplingConfig(),
    seed: int = 0,
    chunk_steps: int = 50,
    context_steps: int | None = None,
    keep_steps: int | None = None,
    progress: bool = True,
    layer_norms: dict | None = None,
    min_rows: int = 1,
) -> Generation:
    """One clip. `layer_norms`: the norms a sidecar recorded, for a bank that carries none (see engine.norms).
    `min_rows` 1: alone for good, no rows padded for company (engine.loop.MIN_ROWS), the fastest way on a CPU."""
    return generate_many(model, [Render(prompt, seed, spec, tuple(bank_paths))], seconds, sampling=sampling,
                         chunk_steps=chunk_steps, context_steps=context_steps, keep_steps=keep_steps,
                         progress=progress, layer_norms=layer_norms, min_rows=min_rows)[0]


def generate_many(
    model: MusicModel,
    renders: Sequence[Render],
    seconds: float,
    *,
    sampling: SamplingConfig = SamplingConfig(),
    chunk_steps: int = 50,
    context_steps: int | None = None,
    keep_steps: int | None = None,
    progress: bool = True,
    layer_norms: dict | None = None,
    min_rows: int = MIN_ROWS,
) -> list[Generation]:
    """Clips of the same length and sampling, made together: one batched forward per step for all of them
    (engine.loop.Engine), their audio decoded together. Each clip's tokens are the ones it gets made alone with
    the same `min_rows` (recorded in its sidecar, so `generate_from_sidecar` makes it again exactly)."""
    check_seconds(seconds)
    fields.whole("chunk_steps", chunk_steps, 1)
    fields.whole("min_rows", min_rows, 1, 64)
    if not renders:
        return []
    frames = max(1, round(seconds * model.frame_rate))
    prepared = []
    for r in renders:
        if not isinstance(r.prompt, str):
            raise ValueError(f"prompt must be a string, got {fields.shown(r.prompt)}")
        bank = load_steering_banks(r.spec, r.bank_paths)
        plan = None
        if r.spec is not None and r.spec.controls:
            if r.spec.units == "relative":
                bank = with_layer_norms(bank, model, layer_norms)
            plan = SteeringPlan.compile(r.spec, bank, model.fingerprint, device=model.device, dtype=model.dtype)
        prepared.append((r, bank, plan))
    engine = Engine(model, context_steps=context_steps, guidance=sampling.uses_guidance, slots=len(renders),
                    min_rows=min_rows)
    gens = [Generator(model, r.prompt, sampling=sampling, seed=r.seed, plan=plan, total_frames=frames,
                      keep_steps=keep_steps, engine=engine) for r, _, plan in prepared]
    streams = [streaming_decoder(model.hf.audio_encoder) for _ in gens]
    pieces: list[list[torch.Tensor]] = [[] for _ in gens]
    label = "generating" if len(gens) == 1 else f"generating {len(gens)} clips"
    with tqdm(total=gens[0].steps_for_frames(frames), unit="step", disable=not progress,
              desc=model.progress_label(label)) as bar:
        while not all(g.finished for g in gens):
            start = gens[0].step
            for _ in range(chunk_steps):
                live = [g for g in gens if not g.finished]
                if not live:
                    break
                engine.step(live)
            bar.update(gens[0].step - start)
            chunks = [g.take_chunk(start) for g in gens]
            for piece, pcm in zip(pieces, push_together(streams, [c.codes for c in chunks])):
                piece.append(pcm)
    out = []
    for (r, bank, plan), gen, stream, piece in zip(prepared, gens, streams, pieces):
        piece.append(stream.flush())
        audio = torch.cat([p.reshape(-1).float().cpu() for p in piece]).numpy()
        codes = gen.codes()
        gen.close()
        settings = {
            "format": SIDECAR_FORMAT,
            "version": SIDECAR_VERSION,
            **provenance(model, r.bank_paths, bank),
            "note": NOISE_WARNING if model.is_random else "",
            "prompt": r.prompt,
            "seconds": seconds,
            "frames": frames,
            "sample_rate": model.sample_rate,
            "seed": r.seed,
            "sampling": sampling.to_dict(),
            "steering": r.spec.to_dict() if r.spec is not None else None,
            # What each strength meant in hidden-state units: per direction, the norm it adds at each layer at full
            # schedule with the gate open.
            "vector_norms": plan.vector_norms() if plan is not None else None,
            "context_steps": gen.context_steps,
            "keep_steps": gen.keep_steps,
            "chunk_steps": chunk_steps,
            # Rows the engine computed at least (engine.loop.MIN_ROWS): part of what decides the tokens' last bits.
            "min_rows": min_rows,
            "tokens_sha256": tokens_sha256(codes),
            "versions": {"torch": torch.__version__, "python": platform.python_version()},
        }
        out.append(Generation(audio=audio, sample_rate=model.sample_rate, codes=codes, settings=settings))
    return out


def check_sidecar(settings: Any, where: str = "sidecar") -> tuple[SteeringSpec | None, SamplingConfig]:
    """Every value `generate_from_sidecar` uses, checked before a model is loaded: ValueError naming `where`
    (the file), the key and the problem. Returns the steering spec and sampling it holds."""
    if not isinstance(settings, dict):
        raise ValueError(f"{where}: a render sidecar is a JSON object, got {type(settings).__name__}")
    if settings.get("format") != SIDECAR_FORMAT:
        raise ValueError(f"{where}: not a musicrfm render sidecar (format {fields.shown(settings.get('format'))})")
    version = settings.get("version")
    if isinstance(version, bool) or version not in (1, SIDECAR_VERSION):
        raise ValueError(f"{where}: sidecar version {fields.shown(version)} is not supported (1 or {SIDECAR_VERSION})")
    for key in _SIDECAR_KEYS:
        if key not in settings:
            raise ValueError(f"{where}: the sidecar lacks {key!r}")
    for key in _SIDECAR_STRINGS:
        if not isinstance(settings[key], str):
            raise ValueError(f"{where}: {key} must be a string, got {fields.shown(settings[key])}")
    check_bank_entries(f"{where}: banks", settings["banks"])
    if not isinstance(settings.get("tokens_sha256", ""), str):  # optional: what a regeneration is compared with
        raise ValueError(f"{where}: tokens_sha256 must be a string, got {fields.shown(settings['tokens_sha256'])}")
    try:
        check_seconds(settings["seconds"])
        fields.whole("seed", settings["seed"], 0, 2**63 - 1)
        fields.whole("chunk_steps", settings["chunk_steps"], 1, 10**6)
        if settings.get("min_rows") is not None:  # (absent in sidecars made before the batched engine: 1)
            fields.whole("min_rows", settings["min_rows"], 1, 64)
        for key, lo in (("context_steps", 1), ("keep_steps", 0)):
            if settings[key] is not None:
                fields.whole(key, settings[key], lo, 2**31)
        sampling = SamplingConfig.from_dict(settings["sampling"])
        steering = legacy_spec(settings["steering"]) if version == 1 else settings["steering"]
        spec = SteeringSpec.from_dict(steering) if steering else None
        if settings.get("layer_norms") is not None:
            LayerNorms.from_dict(settings["layer_norms"])
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{where}: {exc}") from None
    return spec, sampling


def generate_from_sidecar(settings: dict, *, progress: bool = True, model: MusicModel | None = None,
                          where: str = "sidecar") -> Generation:
    """Regenerate a generation from its sidecar (`where`: its file, for errors). Every value is checked and
    the banks against the recorded hashes before the model loads."""
    spec, sampling = check_sidecar(settings, where)
    check_bank_hashes(settings["banks"], "sidecar", "render")
    load_steering_banks(spec, [b["path"] for b in settings["banks"]])
    if model is None:
        model = load_model(settings["model"], device=settings["device"], dtype=settings["dtype"])
    return generate(
        model, settings["prompt"], settings["seconds"], spec=spec,
        bank_paths=[b["path"] for b in settings["banks"]],
        sampling=sampling, seed=settings["seed"],
        chunk_steps=settings["chunk_steps"], context_steps=settings["context_steps"],
        keep_steps=settings["keep_steps"], progress=progress, layer_norms=settings.get("layer_norms"),
        min_rows=settings.get("min_rows") or 1,
    )


def write_sidecar(path: str | Path, settings: dict) -> None:
    Path(path).write_text(json.dumps(settings, indent=2) + "\n")
