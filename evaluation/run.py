"""`musicrfm eval sweep`'s driver: plan the units of a preset, generate and measure each clip, locally or
over a Ray cluster, and keep the finished ones in a resumable `units.jsonl`.

Each chunk of units generates its clips together with engine.generation.generate_many (the one decode path;
a clip's tokens do not depend on the chunk) and measures each clip: an
embedding (for FD / MMD², computed per group against the reference by evaluation.report), CLAP score vs
the prompt (when CLAP weights are supplied), the independent audio checks, the probe's prediction and, for
schedules / crossfade, traces over time (evaluation.measure). Finished units are appended to `units.jsonl`
in the output directory; a rerun skips them. The driver alone writes files, so local and Ray runs store the
same records and produce the same CSV rows.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from musicrfm.engine.generation import Render, file_sha256, generate_many
from musicrfm.engine.model import NOISE_LABEL, is_random_model
from musicrfm.probes.train import REGRESSION_CONCEPTS

from musicrfm.engine.steering import PITCH_CLASSES, QUALITY_CONCEPT, QUALITY_TONES, READOUT_CONCEPT, LayerWeighting

from .measure import (FittedProbe, FittedRegressor, check_clip, check_trace, chord_measures, fit_probe, fit_regressor,
                      segment, window_bounds)
from .presets import (OPTIMAL_LAYERS, PAPER_FRAME_RATE, SweepSettings, Unit, build_configurations, method_banks,
                      plan_units)
from .report import SweepReport, aggregate

__all__ = ["SweepResult", "WorkerContext", "bank_index", "run_chunk", "run_sweep", "run_unit"]


def bank_index(paths: Sequence[str]) -> tuple[dict[str, list[str]], dict[tuple[str, str], str], object]:
    """concept -> classes, (concept, injection point) -> the bank file holding it, and the banks' model
    fingerprint. Banks are read one by one, not merged: a unit generates with the banks of its own concepts (at
    its own site) only, so a unit's settings name exactly the files that shaped it. A concept may have one bank
    per injection point (the methods preset compares them), with the same classes."""
    from musicrfm.engine.bank import BankMismatchError, DirectionBank

    classes: dict[str, list[str]] = {}
    where: dict[tuple[str, str], str] = {}
    fingerprint = None
    for path in paths:
        bank = DirectionBank.load(path)
        if fingerprint is None:
            fingerprint = bank.fingerprint
        bank.check_compatible(fingerprint)
        for concept, names in bank.concepts.items():
            key = (concept, bank.injection_point)
            if key in where:
                raise BankMismatchError(f"concept {concept!r} is in two banks: {where[key]} and {path}")
            if concept in classes and classes[concept] != list(names):
                raise BankMismatchError(f"concept {concept!r} has other classes in {path} than in another bank")
            classes[concept], where[key] = list(names), str(path)
    # The quality controls are steered with the notes bank (engine.steering.QUALITY_TONES); their classes follow a
    # chords bank's order where one is given, so the chord-quality preset's cycles line up. A bank's own concept of
    # that name keeps its place, as engine.steering.steerable_keys does.
    own = QUALITY_CONCEPT in classes
    for (concept, site), path in list(where.items()):
        if concept == READOUT_CONCEPT and classes[concept] == list(PITCH_CLASSES) and not own:
            where[(QUALITY_CONCEPT, site)] = path
            chords = classes.get("chords", [])
            classes[QUALITY_CONCEPT] = (list(chords) if chords and set(chords) <= set(QUALITY_TONES)
                                        else list(QUALITY_TONES))
    return classes, where, fingerprint


class WorkerContext:
    """What units need where they run: the model, the banks as files, the embedders, the fitted probes."""

    def __init__(self, settings: SweepSettings, model, bank_paths: Sequence[str], probes: dict[str, FittedProbe]):
        from .embedding import ClapEmbedder, LogMelStatsEmbedder

        if abs(model.frame_rate - PAPER_FRAME_RATE) > 1e-6:
            raise ValueError(f"{model.name} runs at {model.frame_rate} steps/s; sweeps assume MusicGen's "
                             f"{PAPER_FRAME_RATE:g}")
        self.settings = settings
        self.model = model
        self.bank_paths = list(bank_paths)
        _, self.concept_bank, _ = bank_index(self.bank_paths)
        self.probes = probes
        self.clap = ClapEmbedder(settings.clap, device=str(model.device)) if settings.clap else None
        self.embedder = self.clap if self.clap is not None else LogMelStatsEmbedder.named(settings.embedder)
        self.layer_norms = self._layer_norms()
        if self.embedder.name != settings.embedder_name:
            raise ValueError(f"embedder {self.embedder.name} is not the one the sweep records ({settings.embedder_name})")

    def _layer_norms(self) -> dict | None:
        """The layer norms relative strength reads, for banks that carry none: the model's, measured once here
        rather than once per clip (they belong to the model and injection point, not to a bank)."""
        from musicrfm.engine.bank import DirectionBank
        from musicrfm.engine.norms import with_layer_norms

        for path in self.bank_paths:
            bank = DirectionBank.load(path)
            if bank.layer_norms is None:
                return with_layer_norms(bank, self.model).layer_norms.to_dict()
        return None

    @classmethod
    def remote(cls, payload: dict) -> WorkerContext:
        """Build on a worker: write the banks (shipped as bytes, checked by hash), load the model."""
        import torch
        from transformers.utils import logging as hf_logging

        from musicrfm.engine.model import load_model

        hf_logging.set_verbosity_error()
        settings: SweepSettings = payload["settings"]
        torch.set_num_threads(settings.threads or 1)
        # Banks travel as bytes (no shared file system needed), stored once per content hash.
        folder = Path(tempfile.gettempdir()) / "musicrfm-sweep-banks"
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for sha, data in payload["banks"]:
            if hashlib.sha256(data).hexdigest() != sha:
                raise ValueError("a direction bank was corrupted on its way to the worker")
            path = folder / f"{sha}.safetensors"
            if not path.is_file() or file_sha256(path) != sha:
                fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                os.replace(tmp, path)
            paths.append(str(path))
        model = load_model(settings.model, device=settings.device, dtype=settings.dtype)
        return cls(settings, model, paths, payload["probes"])


def _trace(ctx: WorkerContext, unit: Unit, audio: np.ndarray, sr: int) -> dict:
    s = ctx.settings
    bounds = window_bounds(len(audio), sr, s.window, s.hop)
    out: dict = {"t": [round((a + b) / 2 / sr, 6) for a, b in bounds], "probe": {}, "check": {}}
    probe_cache: dict[str, np.ndarray] = {}
    several = len({t["concept"] for t in unit.targets}) > 1  # e.g. the reference of a two-concept sweep
    for t in unit.targets:
        name = (f"{t['concept']} " if several else "") + (t["role"] or "target")
        probe = ctx.probes.get(t["concept"])
        if probe is not None and t["class"] in probe.classes:
            if t["concept"] not in probe_cache:
                probe_cache[t["concept"]] = probe.proba(ctx.model, [audio[a:b] for a, b in bounds])
            out["probe"][name] = [float(v) for v in probe_cache[t["concept"]][:, probe.classes.index(t["class"])]]
        series = check_trace(t["concept"], t["class"], audio, sr, bounds)
        if series is not None:
            out["check"][name] = series
    return out


def _chord(unit: Unit, audio: np.ndarray, sr: int) -> dict | None:
    """The chord measures of a clip with a chords target, relative to the root its notes target steers (chord-quality
    preset), else to the template's root; None for clips without a chords target."""
    from musicrfm.probes.syntheory import PITCH_NAMES

    if not any(t["concept"] == "chords" for t in unit.targets):
        return None
    roots = [t for t in unit.targets if t["concept"] == "notes" and t["class"] in PITCH_NAMES]
    steered = roots and unit.spec is not None and any(c.key == f"notes:{roots[0]['class']}" and c.coefficient
                                                      for c in unit.spec.controls)
    return chord_measures(audio, sr, PITCH_NAMES.index(roots[0]["class"]) if steered else None)


def run_unit(ctx: WorkerContext, unit: Unit) -> dict:
    """Generate one clip and measure it. Returns the record stored in units.jsonl."""
    return run_chunk(ctx, [unit])[0]


def run_chunk(ctx: WorkerContext, units: Sequence[Unit]) -> list[dict]:
    """Generate a chunk's clips together (engine.generation.generate_many: one batched forward per step; each clip
    the tokens it gets alone, so chunking never changes a result) and measure each."""
    started = time.perf_counter()
    s = ctx.settings
    renders = []
    for unit in units:
        concepts = [c.key.partition(":")[0] for c in unit.spec.controls] if unit.spec is not None else []
        banks = tuple(p for p in ctx.bank_paths if p in {ctx.concept_bank[(c, unit.spec.site)] for c in concepts})
        renders.append(Render(unit.prompt, unit.seed, unit.spec, banks))
    results = generate_many(ctx.model, renders, s.seconds, sampling=s.sampling, progress=False,
                            layer_norms=ctx.layer_norms)
    each = (time.perf_counter() - started) / len(units)
    return [_measure(ctx, unit, result, each) for unit, result in zip(units, results)]


def _measure(ctx: WorkerContext, unit: Unit, result, generation_seconds: float) -> dict:
    started = time.perf_counter()
    s = ctx.settings
    audio, sr = result.audio, result.sample_rate
    embedding = ctx.embedder.embed([audio], sr)[0]
    clap = float(ctx.clap.clap_score([audio], [unit.prompt], sr)[0]) if ctx.clap is not None else None
    targets = []
    for t in unit.targets:
        part = segment(audio, t["window"])
        entry = dict(t)
        entry["check"] = check_clip(t["concept"], t["class"], part, sr)
        probe = ctx.probes.get(t["concept"])
        if probe is not None and t["class"] in probe.classes:
            p = probe.proba(ctx.model, [part])[0]
            pred = probe.classes[int(np.argmax(p))]
            entry["probe"] = {"pred": pred, "correct": pred == t["class"],
                              "p_target": float(p[probe.classes.index(t["class"])])}
        elif isinstance(probe, FittedRegressor):  # a regression (tempo): its reading, no class to be right about
            bpm = float(probe.predict(ctx.model, [part])[0])
            entry["probe"] = {"pred": f"{bpm:.1f} BPM", "correct": None, "p_target": None, "bpm": bpm}
        else:
            entry["probe"] = None
        targets.append(entry)
    record = {
        "unit": unit.key, "config": unit.config, "sample": unit.sample, "prompt": unit.prompt, "seed": unit.seed,
        "steering": unit.spec.to_dict() if unit.spec is not None else None, "targets": targets,
        "vector_norms": result.settings["vector_norms"],
        "tokens_sha256": result.settings["tokens_sha256"], "random_weights": bool(result.settings["random_weights"]),
        "embedder": ctx.embedder.name, "embedding": [float(v) for v in embedding], "clap": clap,
        "trace": _trace(ctx, unit, audio, sr) if unit.trace else None,
        "chord": _chord(unit, audio, sr),
        "sample_rate": sr, "device": result.settings["device"], "dtype": result.settings["dtype"],
        "worker": f"{platform.node()}:{os.getpid()}",
        # The clip's share of its chunk's generation, and its own measuring.
        "elapsed_s": round(generation_seconds + time.perf_counter() - started, 3),
    }
    if s.save_audio:
        record["_audio"] = audio
    return record


class _RayWorker:
    """A Ray actor: one model per worker process (one GPU each when the cluster has GPUs)."""

    def __init__(self, payload: dict):
        self.ctx = WorkerContext.remote(payload)

    def run(self, units: list[Unit]) -> list[dict]:
        return run_chunk(self.ctx, units)


# --------------------------------------------------------------------------------------------
# The driver


@dataclass
class SweepResult(SweepReport):
    """The outputs (evaluation.report) and what this run did to get them."""

    generated: int  # units run this time
    skipped: int  # units found done


def _read_records(path: Path, *, repair: bool = False) -> dict[str, dict]:
    """The finished units. A line cut by an interruption is skipped (that unit runs again); with `repair` the
    file is rewritten without it, so that the next record appended starts on a line of its own."""
    records: dict[str, dict] = {}
    if not path.is_file():
        return records
    text = path.read_text()
    lines = text.splitlines()
    kept = []
    for line in lines:
        try:
            rec = json.loads(line)
            records[rec["unit"]] = rec
            kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    if repair and (len(kept) != len(lines) or (text and not text.endswith("\n"))):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    return records


def _check_manifest(out: Path, manifest: dict) -> None:
    path = out / "sweep.json"
    if path.is_file():
        old = json.loads(path.read_text())
        differ = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
        if differ:
            raise ValueError(f"{out} holds a sweep with other settings ({', '.join(differ)} differ); "
                             "use another --out directory (results never mix)")
    else:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(manifest, indent=1) + "\n")


def _fit_probes(settings: SweepSettings, concepts: Iterable[str], fingerprint, out: Path,
                progress: bool) -> tuple[dict[str, FittedProbe | FittedRegressor], dict[str, str]]:
    """Probes for the concepts with features (a regressor for a regression concept); the reason for the others
    (a regression concept has no probe accuracy either way)."""
    probes, missing = {}, {}
    for c in concepts:
        if not settings.features:
            missing[c] = "unavailable: no --features given"
        elif c in REGRESSION_CONCEPTS and not (Path(settings.features) / c / "index.json").is_file():
            missing[c] = "n/a: regression concept"
        elif not (Path(settings.features) / c / "index.json").is_file():
            missing[c] = f"unavailable: no features of {c} in {settings.features}"
        elif c in REGRESSION_CONCEPTS:
            from musicrfm.engine.model import pick_device

            missing[c] = "n/a: regression concept (the regressor's BPM: probe_bpm)"
            probes[c] = fit_regressor(Path(settings.features) / c, fingerprint=fingerprint, seed=settings.probe_seed,
                                      trials=settings.probe_trials, layer=settings.probe_layer,
                                      device=pick_device(settings.probe_device).type, cache=out / "probe.json",
                                      progress=progress)
        else:
            from musicrfm.engine.model import pick_device

            probes[c] = fit_probe(Path(settings.features) / c, fingerprint=fingerprint, seed=settings.probe_seed,
                                  trials=settings.probe_trials, layer=settings.probe_layer,
                                  device=pick_device(settings.probe_device).type, cache=out / "probe.json",
                                  progress=progress)
    return probes, missing


def _chunks(units: Sequence[Unit], size: int) -> list[list[Unit]]:
    out: list[list[Unit]] = []
    for _, group in itertools.groupby(units, key=lambda u: u.config):
        group = list(group)
        out.extend(group[i:i + size] for i in range(0, len(group), size))
    return out


def _ray_pool(address: str, payload: dict, chunks: list[list[Unit]], workers: int | None):
    """Yield each chunk's records as workers finish them."""
    try:
        import ray
        from ray.util import ActorPool
    except ImportError:
        raise RuntimeError("--ray needs Ray: pip install 'musicrfm[ray]' (or pip install ray)") from None
    started = False
    if not ray.is_initialized():
        ray.init(address=None if address == "local" else address, include_dashboard=False,
                 logging_level="WARNING")
        started = True
    try:
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        per_worker = {"num_gpus": 1, "num_cpus": 1} if gpus >= 1 else {"num_cpus": 1}
        available = gpus if gpus >= 1 else max(1, int(resources.get("CPU", 1)))
        n = max(1, min(workers or available, available, len(chunks)))
        ref = ray.put(payload)
        actor = ray.remote(_RayWorker)
        pool = ActorPool([actor.options(**per_worker).remote(ref) for _ in range(n)])
        yield from pool.map_unordered(lambda a, chunk: a.run.remote(chunk), chunks)
    finally:
        if started:
            ray.shutdown()


def run_sweep(settings: SweepSettings, *, ray: str | None = None, workers: int | None = None,
              progress: bool = True, model=None, log: Callable[[str], None] | None = None) -> SweepResult:
    """Run (or resume) a sweep into settings.out and write its CSV, PNG and Markdown outputs.

    ray: None runs units here; "auto" or an address joins a Ray cluster, "local" starts a Ray instance here
    (an already initialised Ray is used as it is). `model`: an already loaded MusicModel for local runs."""
    from tqdm import tqdm

    log = log or (lambda msg: print(msg, file=sys.stderr))
    out = Path(settings.out)
    classes, _, fingerprint = bank_index(settings.banks)
    methods = None
    if settings.preset == "methods":
        layers = LayerWeighting.parse(settings.layers) if settings.layers else OPTIMAL_LAYERS
        methods = method_banks(settings.banks, settings.concepts, layers)
    configs = build_configurations(settings.preset, settings.concepts, classes, fingerprint.num_layers,
                                   settings.seconds, settings.eta0, settings.units, methods=methods)
    _, where, _ = bank_index(settings.banks)
    for cfg in configs:
        for t in cfg.controls:
            if (t.concept, cfg.site) not in where:
                have = ", ".join(f"{site} ({Path(p).name})" for (c, site), p in where.items() if c == t.concept)
                raise ValueError(f"preset {settings.preset!r} steers {t.concept} at the {cfg.site} site, but its bank "
                                 f"was read at: {have}; steer a bank where it was read (an attention bank: "
                                 "--preset methods, or `musicrfm generate --site attention`)")
    _check_manifest(out, settings.manifest())
    units = plan_units(settings, configs, classes)
    records_path = out / "units.jsonl"
    done = _read_records(records_path, repair=True)
    pending = [u for u in units if u.key not in done]
    skipped = len(units) - len(pending)
    used_concepts = list(dict.fromkeys(t.concept for c in configs for t in c.controls))
    probes, probe_missing = _fit_probes(settings, used_concepts, fingerprint, out, progress)
    for p in probes.values():
        log(f"probe: {p.describe()}")
    if pending:
        desc = f"sweep {settings.preset}" + (f" ({NOISE_LABEL})" if is_random_model(settings.model) else "")
        bar = tqdm(total=len(pending), unit="clip", desc=desc, disable=not progress)
        chunks = _chunks(pending, settings.chunk)
        with bar, records_path.open("a") as fh:
            def store(records: list[dict]) -> None:
                for rec in records:
                    audio = rec.pop("_audio", None)
                    if audio is not None:
                        from musicrfm.engine.audio import write_wav

                        wav = out / "audio" / _slug(rec["config"]) / f"{rec['sample']:05d}.wav"
                        wav.parent.mkdir(parents=True, exist_ok=True)
                        write_wav(wav, audio, rec["sample_rate"])
                    fh.write(json.dumps(rec) + "\n")
                    fh.flush()
                    bar.update(1)

            if ray is None:
                import torch

                from musicrfm.engine.model import load_model

                if settings.threads:
                    torch.set_num_threads(settings.threads)
                if model is None:
                    model = load_model(settings.model, device=settings.device, dtype=settings.dtype)
                elif model.name != settings.model:
                    raise ValueError(f"the model given is {model.name}, the sweep's settings name {settings.model}")
                ctx = WorkerContext(settings, model, settings.banks, probes)
                for chunk in chunks:
                    store(run_chunk(ctx, chunk))
            else:
                payload = {"settings": settings,
                           "banks": [(file_sha256(b), Path(b).read_bytes()) for b in settings.banks],
                           "probes": probes}
                for records in _ray_pool(ray, payload, chunks, workers):
                    store(records)
    records = _read_records(records_path)
    report = aggregate(settings, configs, records, probes, probe_missing)
    if settings.preset == "chord-quality":
        from .chord_quality import write_chord_quality

        report.files.update(write_chord_quality(out, configs, records))
    return SweepResult(**vars(report), generated=len(pending), skipped=skipped)


def _slug(name: str) -> str:
    """A configuration name as a folder name (audio/<slug>/)."""
    return "".join(ch if ch.isalnum() or ch in "-_.=" else "_" for ch in name)
