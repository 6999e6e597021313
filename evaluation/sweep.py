"""`musicrfm eval sweep`: the paper's steering evaluations as resumable sweeps, locally or over a Ray cluster.

A preset is data: a name -> a list of named configurations, each a SteeringSpec template (controls with a
coefficient, schedule, layer weighting, gate) whose target classes are filled in per sample.

  eta        single direction over eta0 in {0.15, 0.30, 0.45, 0.60}, p = 0.3, exponential kappa 0.95 (Table 2, Fig. 2)
  pairs      every pair of concepts, eta0 in {0.3, 0.6}^2, grouped by attribute (Table 5)
  schedules  linear rise / decay, exponential decay, logistic rise, sine (Table 6, Fig. 1a)
  crossfade  n1 -> n2 over the whole clip, eta0 0.45 (Sec. 6.2, Fig. 1b)
  layers     linear, exponential kappa 0.98 / 0.95 / 0.92, uniform; p = 1 (Table 8)
  topk       top-K layers, K in {4, 8, 12, 16, 24, 32, 48} scaled to the model's depth; p = 1 (Table 9)
  gate       p in {0.15, 0.30, 0.45, 0.6, 0.75, 0.9, 1.0}, uniform layers (Table 10)

The unit of work is one (configuration, sample): sample i has its own prompt (prompts[i % len]), seed
(derived from the sweep seed and i only, so it does not matter which worker runs it) and target classes;
the unsteered reference set is the configuration "reference" with the same prompts and seeds. Each unit
renders with engine.generation.generate (the one decode path) and measures its clip: an embedding (for FD / MMD²,
computed per group against the reference at the end), CLAP score vs the prompt (when CLAP weights are
supplied), the independent checks, the probe's prediction and, for schedules / crossfade, traces over time.
Finished units are appended to `units.jsonl` in the output directory; a rerun skips them. The driver alone
writes files, so local and Ray runs store the same records and produce the same CSV rows.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from musicrfm.engine.generation import file_sha256, generate
from musicrfm.engine.sampling import SamplingConfig
from musicrfm.engine.steering import DirectionControl, LayerWeighting, Schedule, SteeringSpec

from .evaluate import CHECKS, FittedProbe, check_clip, check_name, check_trace, segment, window_bounds

__all__ = [
    "PRESETS",
    "PAPER",
    "NOISE_LABEL",
    "REFERENCE",
    "ControlTemplate",
    "Configuration",
    "SweepSettings",
    "SweepResult",
    "Unit",
    "bank_index",
    "build_configurations",
    "plan_units",
    "run_sweep",
    "run_unit",
    "aggregate",
]

FORMAT = "musicrfm.sweep"
VERSION = 1
PRESETS = ("eta", "pairs", "schedules", "crossfade", "layers", "topk", "gate")
PAPER = {
    "eta": "Table 2 and Fig. 2 (single direction over eta0)",
    "pairs": "Table 5 (pairwise multi-direction, grouped by attribute)",
    "schedules": "Table 6 and Fig. 1a (time schedules)",
    "crossfade": "Sec. 6.2 and Fig. 1b (two-class crossfade)",
    "layers": "Table 8 (layer weighting)",
    "topk": "Table 9 (top-K layer selection)",
    "gate": "Table 10 (gate probability p)",
}
NOISE_LABEL = "random weights: noise"
REFERENCE = "reference"  # the unsteered configuration
REFERENCE_GROUP = "reference (unsteered)"
DEFAULT_PROMPTS = ("lofi hip hop beat with warm piano", "slow dreamy ambient synth pad",
                   "acoustic guitar folk song", "upbeat jazz trio with double bass")
FRAME_RATE = 50  # MusicGen steps per second (EnCodec 32 kHz, hop 640): the clock of schedules
PAPER_STEPS = 1500  # App. E defines the schedules over 1500 steps (30 s)
REGRESSION_CONCEPTS = ("tempos",)

# The paper's settings. "Optimal" (Sec. 5.1): gate p = 0.3, exponential layer weighting w0 = 1, kappa = 0.95.
OPTIMAL_GATE = 0.3
OPTIMAL_LAYERS = LayerWeighting("exponential", kappa=0.95, w0=1.0)
# The ablations (App. C) share one "naive" row in Tables 8, 9 and 10 (uniform layers, K = 48, p = 1.0, all
# with FD 0.599): each varies one knob from uniform weighting with the gate always open.
NAIVE_LAYERS = LayerWeighting("all", w0=1.0)
ETA_LEVELS = (0.15, 0.30, 0.45, 0.60)
PAIR_LEVELS = (0.3, 0.6)
DEFAULT_ETA0 = 0.45  # schedules / crossfade (Sec. 6.2's value); the ablations do not state theirs
TOPK_PAPER = (4, 8, 12, 16, 24, 32, 48)  # of 48 layers
GATE_LEVELS = (0.15, 0.30, 0.45, 0.6, 0.75, 0.9, 1.0)


# --------------------------------------------------------------------------------------------
# Presets as data


@dataclass(frozen=True)
class ControlTemplate:
    """One control of a configuration; its class is chosen per sample.

    pick: "cycle" = classes[i % C] (every class equally often, for the per-class mean); "random" = a seeded
    draw from (sweep seed, sample, concept); "other" = a seeded draw among the classes other than the previous
    control's (crossfade n2). `window` (fractions of the clip) is where the check and the probe judge it;
    `group` names the results row it counts toward (None: the configuration's name)."""

    concept: str
    coefficient: float
    schedule: Schedule = field(default_factory=Schedule)
    pick: str = "cycle"
    role: str = ""
    window: tuple[float, float] = (0.0, 1.0)
    group: str | None = None
    x: float | None = None


@dataclass(frozen=True)
class Configuration:
    name: str
    controls: tuple[ControlTemplate, ...]
    gate_p: float = OPTIMAL_GATE
    layers: LayerWeighting = OPTIMAL_LAYERS
    trace: bool = False  # probe / check traces over time (schedules, crossfade)

    def describe(self) -> str:
        parts = [f"{c.concept}{'(' + c.role + ')' if c.role else ''}={c.coefficient:g}"
                 + ("" if c.schedule.kind == "constant" else f"@{c.schedule.kind}") for c in self.controls]
        return f"{' + '.join(parts)}, gate p={self.gate_p:g}, layers {self.layers}"


def _eta_list(eta0: Sequence[float] | None, default: Sequence[float]) -> tuple[float, ...]:
    return tuple(float(e) for e in (eta0 if eta0 else default))


def _single_eta(preset: str, eta0: Sequence[float] | None) -> float:
    if eta0 and len(eta0) > 1:
        raise ValueError(f"preset {preset!r} takes one --eta0 value, got {list(eta0)}")
    return float(eta0[0]) if eta0 else DEFAULT_ETA0


def scaled_schedules(steps: int) -> list[tuple[str, Schedule]]:
    """App. E's schedules stretched from 1500 steps to `steps` (exactly the paper's at 30 s): the same shape
    over the clip, whatever its length. exp decay keeps 0.998**1500 ~ 0.05 at the end."""
    r = steps / PAPER_STEPS
    return [
        ("linear increase", Schedule("linear_rise", start=0, length=steps)),
        ("linear decay", Schedule("linear_decay", start=0, length=steps)),
        ("exponential decay", Schedule("exp_decay", start=0, lam=0.998 ** (1.0 / r))),
        ("logistic increase", Schedule("logistic", center=750.0 * r, width=200.0 * r)),
        ("sine modulation", Schedule("sine", period=float(steps))),
    ]


def topk_values(num_layers: int) -> list[int]:
    """The paper's K (of 48 layers) scaled to the model's depth, rounded, at least 1, without repeats."""
    out: list[int] = []
    for k in TOPK_PAPER:
        v = max(1, min(num_layers, round(k * num_layers / 48)))
        if v not in out:
            out.append(v)
    return out


def build_configurations(preset: str, concepts: Sequence[str], classes: dict[str, list[str]], num_layers: int,
                         seconds: float, eta0: Sequence[float] | None = None) -> list[Configuration]:
    """The configurations of a preset (the reference is not among them). `classes`: concept -> class names
    from the bank; `num_layers` scales top-K; `seconds` scales schedules and the crossfade."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    concepts = list(dict.fromkeys(concepts))
    if not concepts:
        raise ValueError("name at least one concept (--concept notes)")
    for c in concepts:
        if c not in classes:
            raise ValueError(f"concept {c!r} is not in the bank(s) (they hold: {', '.join(classes) or 'nothing'})")
    steps = max(1, round(seconds * FRAME_RATE))
    configs: list[Configuration] = []
    if preset == "eta":
        for c in concepts:
            for eta in _eta_list(eta0, ETA_LEVELS):
                if c in REGRESSION_CONCEPTS:  # Table 2: -eta and +eta are averaged into the |eta| column
                    for sign in (-1.0, 1.0):
                        configs.append(Configuration(f"{c} eta0={sign * eta:+.2f}", (ControlTemplate(
                            c, sign * eta, group=f"{c} |eta0|={eta:.2f}", x=eta),)))
                else:
                    configs.append(Configuration(f"{c} eta0={eta:.2f}", (ControlTemplate(c, eta, x=eta),)))
    elif preset == "pairs":
        usable = [c for c in concepts if c not in REGRESSION_CONCEPTS]
        if len(usable) < 2:
            raise ValueError("the pairs preset needs at least two classification concepts "
                             "(--concept notes,chords,intervals as in Table 5)")
        levels = _eta_list(eta0, PAIR_LEVELS)
        for a, b in itertools.combinations(usable, 2):
            for ea, eb in itertools.product(levels, levels):
                configs.append(Configuration(f"{a}+{b} eta0={ea:.2f}/{eb:.2f}", (
                    ControlTemplate(a, ea, pick="cycle", group=f"{a} eta0={ea:.2f}", x=ea),
                    ControlTemplate(b, eb, pick="random", group=f"{b} eta0={eb:.2f}", x=eb))))
    elif preset == "schedules":
        eta = _single_eta(preset, eta0)
        for c in concepts:
            for label, schedule in scaled_schedules(steps):
                configs.append(Configuration(f"{c} {label}", (ControlTemplate(c, eta, schedule),), trace=True))
    elif preset == "crossfade":
        eta = _single_eta(preset, eta0)
        for c in concepts:
            if c in REGRESSION_CONCEPTS or len(classes[c]) < 2:
                raise ValueError(f"a crossfade needs two classes of one concept; {c!r} has {classes[c]}")
            # Sec. 6.2: n1 decays linearly from eta0 to 0 while n2 rises from 0 to eta0 over the window (the
            # paper's 0-1500 steps; here the whole clip). = engine.steering.crossfade(n1, n2, eta0, curve="linear")
            configs.append(Configuration(f"{c} crossfade n1->n2", (
                ControlTemplate(c, eta, Schedule("fade_out", start=0, length=steps, curve="linear"), pick="cycle",
                                role="n1", window=(0.0, 0.25)),
                ControlTemplate(c, eta, Schedule("fade_in", start=0, length=steps, curve="linear"), pick="other",
                                role="n2", window=(0.75, 1.0))), trace=True))
    elif preset == "layers":
        eta = _single_eta(preset, eta0)
        schemes = [("linear", LayerWeighting("linear", w0=1.0)),
                   ("exponential kappa=0.98", LayerWeighting("exponential", kappa=0.98, w0=1.0)),
                   ("exponential kappa=0.95", LayerWeighting("exponential", kappa=0.95, w0=1.0)),
                   ("exponential kappa=0.92", LayerWeighting("exponential", kappa=0.92, w0=1.0)),
                   ("uniform (naive)", NAIVE_LAYERS)]
        for c in concepts:
            for label, weighting in schemes:
                configs.append(Configuration(f"{c} {label}", (ControlTemplate(c, eta),), gate_p=1.0, layers=weighting))
    elif preset == "topk":
        eta = _single_eta(preset, eta0)
        for c in concepts:
            for k in topk_values(num_layers):
                configs.append(Configuration(f"{c} K={k}", (ControlTemplate(c, eta, x=float(k)),), gate_p=1.0,
                                             layers=LayerWeighting("topk", k=k, w0=1.0)))
    else:  # gate
        eta = _single_eta(preset, eta0)
        for c in concepts:
            for p in GATE_LEVELS:
                configs.append(Configuration(f"{c} p={p:.2f}", (ControlTemplate(c, eta, x=p),), gate_p=p,
                                             layers=NAIVE_LAYERS))
    names = [c.name for c in configs]
    assert len(set(names)) == len(names) and REFERENCE not in names
    return configs


# --------------------------------------------------------------------------------------------
# Settings and units


@dataclass(frozen=True)
class SweepSettings:
    preset: str
    banks: tuple[str, ...]
    out: str
    model: str = "tiny-random"
    concepts: tuple[str, ...] = ("notes",)
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    samples: int = 8
    seconds: float = 10.0
    seed: int = 0
    eta0: tuple[float, ...] | None = None  # None: the preset's own levels
    device: str | None = None
    dtype: str | None = None
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    features: str | None = None  # root of `musicrfm extract` output (<root>/<concept>/)
    clap: str | None = None  # CLAP weights (HF id in the local cache, or a directory)
    probe_layer: int | None = None
    probe_trials: int | None = None  # None: the search's default (the paper's 100)
    probe_seed: int = 0  # the split / search seed of `musicrfm train` / `report`
    probe_device: str = "auto"  # where the probe is fitted (as `musicrfm train --device`)
    window: float = 1.0  # trace windows, seconds
    hop: float = 0.5
    chunk: int = 4  # samples per unit of work sent to a worker
    save_audio: bool = False
    threads: int | None = None  # torch threads where units run (Ray workers: this or 1)

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if not self.banks:
            raise ValueError("a sweep steers: give at least one direction bank (--bank FILE)")
        if self.samples < 2:
            raise ValueError(f"FD and MMD need at least 2 samples per configuration, got --samples {self.samples}")
        if not (math.isfinite(self.seconds) and self.seconds > 0):
            raise ValueError(f"seconds must be > 0, got {self.seconds}")
        if not self.prompts or any(not isinstance(p, str) for p in self.prompts):
            raise ValueError("give at least one prompt")
        if self.chunk < 1:
            raise ValueError(f"chunk must be >= 1 sample, got {self.chunk}")
        if self.samples > 2**20:
            raise ValueError(f"too many samples: {self.samples}")

    @property
    def embedder_name(self) -> str:
        if self.clap:
            return f"clap:{self.clap}"
        from .embedding import LogMelStatsEmbedder

        return LogMelStatsEmbedder.name

    def manifest(self) -> dict:
        """What decides the records: a rerun into the same directory must agree on all of it. (`samples`
        may grow or shrink: each sample's seed depends on its index only.)"""
        return {"format": FORMAT, "version": VERSION, "preset": self.preset, "model": self.model,
                "device": self.device or "auto", "dtype": self.dtype or "auto",
                "banks": sorted(file_sha256(b) for b in self.banks), "concepts": list(self.concepts),
                "prompts": list(self.prompts), "seconds": self.seconds, "seed": self.seed,
                "eta0": list(self.eta0) if self.eta0 else None, "sampling": self.sampling.to_dict(),
                "embedder": self.embedder_name, "clap": self.clap,
                "features": str(Path(self.features).resolve()) if self.features else None,
                "probe": {"layer": self.probe_layer, "trials": self.probe_trials, "seed": self.probe_seed},
                "window": self.window, "hop": self.hop}


def derive_seed(seed: int, *parts) -> int:
    """A 32-bit seed from the sweep seed and names/indices: the same on every machine and worker."""
    digest = hashlib.sha256(json.dumps([int(seed), *parts]).encode()).digest()
    return int.from_bytes(digest[:4], "little")


@dataclass(frozen=True)
class Unit:
    """One (configuration, sample): everything a worker needs to generate and measure one clip."""

    config: str
    sample: int
    prompt: str
    seed: int
    spec: SteeringSpec | None  # None: the unsteered reference
    targets: tuple[dict, ...]  # {"concept", "class", "coefficient", "role", "window", "group", "x"}
    trace: bool

    @property
    def key(self) -> str:
        return f"{self.config}#{self.sample}"


def _pick(template: ControlTemplate, classes: list[str], seed: int, sample: int, previous: str | None) -> str:
    if template.pick == "cycle":
        return classes[sample % len(classes)]
    rng = np.random.default_rng(derive_seed(seed, "class", sample, template.concept, template.pick))
    if template.pick == "random":
        return classes[int(rng.integers(len(classes)))]
    others = [c for c in classes if c != previous]
    return others[int(rng.integers(len(others)))]


def plan_units(settings: SweepSettings, configs: Sequence[Configuration],
               classes: dict[str, list[str]]) -> list[Unit]:
    """Every unit of the sweep, reference first, in a fixed order."""
    units: list[Unit] = []
    trace = any(c.trace for c in configs)
    for i in range(settings.samples):
        prompt = settings.prompts[i % len(settings.prompts)]
        seed = derive_seed(settings.seed, "sample", i)
        # The reference is judged against the targets sample i gets (the cycled class of each concept): the
        # accuracy an unsteered clip reaches by chance, the baseline of every row.
        targets = tuple({"concept": c, "class": classes[c][i % len(classes[c])], "coefficient": 0.0, "role": "",
                         "window": [0.0, 1.0], "group": REFERENCE_GROUP, "x": None}
                        for c in dict.fromkeys(t.concept for cfg in configs for t in cfg.controls))
        units.append(Unit(REFERENCE, i, prompt, seed, None, targets, trace))
    for cfg in configs:
        for i in range(settings.samples):
            seed = derive_seed(settings.seed, "sample", i)
            controls, targets, previous = [], [], None
            for t in cfg.controls:
                cls = _pick(t, classes[t.concept], settings.seed, i, previous)
                previous = cls
                controls.append(DirectionControl(f"{t.concept}:{cls}", t.coefficient, t.schedule))
                targets.append({"concept": t.concept, "class": cls, "coefficient": t.coefficient, "role": t.role,
                                "window": list(t.window), "group": t.group or cfg.name, "x": t.x})
            spec = SteeringSpec(controls=tuple(controls), gate_p=cfg.gate_p, gate_seed=seed, layers=cfg.layers)
            units.append(Unit(cfg.name, i, settings.prompts[i % len(settings.prompts)], seed, spec, tuple(targets),
                              cfg.trace))
    return units


# --------------------------------------------------------------------------------------------
# Running one unit


def bank_index(paths: Sequence[str]) -> tuple[dict[str, list[str]], dict[str, str], object]:
    """concept -> classes, concept -> the bank file holding it, and the banks' model fingerprint. Banks are read
    one by one, not merged: a unit renders with the banks of its own concepts only, so a unit's settings name
    exactly the files that shaped it."""
    from musicrfm.engine.bank import BankMismatchError, DirectionBank

    classes: dict[str, list[str]] = {}
    where: dict[str, str] = {}
    fingerprint = None
    for path in paths:
        bank = DirectionBank.load(path)
        if fingerprint is None:
            fingerprint = bank.fingerprint
        bank.check_compatible(fingerprint)
        for concept, names in bank.concepts.items():
            if concept in where:
                raise BankMismatchError(f"concept {concept!r} is in two banks: {where[concept]} and {path}")
            classes[concept], where[concept] = list(names), str(path)
    return classes, where, fingerprint


class WorkerContext:
    """What units need where they run: the model, the banks as files, the embedders, the fitted probes."""

    def __init__(self, settings: SweepSettings, model, bank_paths: Sequence[str], probes: dict[str, FittedProbe]):
        from .embedding import ClapEmbedder, LogMelStatsEmbedder

        if abs(model.frame_rate - FRAME_RATE) > 1e-6:
            raise ValueError(f"{model.name} runs at {model.frame_rate} steps/s; sweeps assume MusicGen's {FRAME_RATE}")
        self.settings = settings
        self.model = model
        self.bank_paths = list(bank_paths)
        _, self.concept_bank, _ = bank_index(self.bank_paths)
        self.probes = probes
        self.clap = ClapEmbedder(settings.clap, device=str(model.device)) if settings.clap else None
        self.embedder = self.clap if self.clap is not None else LogMelStatsEmbedder()
        if self.embedder.name != settings.embedder_name:
            raise ValueError(f"embedder {self.embedder.name} is not the one the sweep records ({settings.embedder_name})")

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


def run_unit(ctx: WorkerContext, unit: Unit) -> dict:
    """Generate one clip with engine.generation.generate and measure it. Returns the record stored in units.jsonl."""
    started = time.perf_counter()
    s = ctx.settings
    concepts = [c.key.partition(":")[0] for c in unit.spec.controls] if unit.spec is not None else []
    banks = [p for p in ctx.bank_paths if p in {ctx.concept_bank[c] for c in concepts}]
    result = generate(ctx.model, unit.prompt, s.seconds, spec=unit.spec, bank_paths=banks, sampling=s.sampling,
                    seed=unit.seed, progress=False)
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
        else:
            entry["probe"] = None
        targets.append(entry)
    record = {
        "unit": unit.key, "config": unit.config, "sample": unit.sample, "prompt": unit.prompt, "seed": unit.seed,
        "steering": unit.spec.to_dict() if unit.spec is not None else None, "targets": targets,
        "tokens_sha256": result.settings["tokens_sha256"], "random_weights": bool(result.settings["random_weights"]),
        "embedder": ctx.embedder.name, "embedding": [float(v) for v in embedding], "clap": clap,
        "trace": _trace(ctx, unit, audio, sr) if unit.trace else None,
        "sample_rate": sr, "device": result.settings["device"], "dtype": result.settings["dtype"],
        "worker": f"{platform.node()}:{os.getpid()}", "elapsed_s": round(time.perf_counter() - started, 3),
    }
    if s.save_audio:
        record["_audio"] = audio
    return record


def run_chunk(ctx: WorkerContext, units: Sequence[Unit]) -> list[dict]:
    return [run_unit(ctx, u) for u in units]


class _RayWorker:
    """A Ray actor: one model per worker process (one GPU each when the cluster has GPUs)."""

    def __init__(self, payload: dict):
        self.ctx = WorkerContext.remote(payload)

    def run(self, units: list[Unit]) -> list[dict]:
        return run_chunk(self.ctx, units)


# --------------------------------------------------------------------------------------------
# The driver


@dataclass
class SweepResult:
    out: Path
    rows: list[dict]  # results.csv
    clip_rows: list[dict]  # clips.csv
    files: dict[str, Path]
    generated: int  # units run this time
    skipped: int  # units found done
    random_weights: bool


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
                progress: bool) -> tuple[dict[str, FittedProbe], dict[str, str]]:
    """Probes for the concepts with features; the reason for the others."""
    from .evaluate import fit_probe

    probes, missing = {}, {}
    for c in concepts:
        if not settings.features:
            missing[c] = "unavailable: no --features given"
        elif c in REGRESSION_CONCEPTS:
            missing[c] = "n/a: regression concept"
        elif not (Path(settings.features) / c / "index.json").is_file():
            missing[c] = f"unavailable: no features of {c} in {settings.features}"
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
    configs = build_configurations(settings.preset, settings.concepts, classes, fingerprint.num_layers,
                                   settings.seconds, settings.eta0)
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
        is_random = settings.model.startswith(("tiny-random", "random-"))
        desc = f"sweep {settings.preset}" + (f" ({NOISE_LABEL})" if is_random else "")
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
    result = aggregate(settings, configs, records, probes, probe_missing)
    result.generated, result.skipped = len(pending), skipped
    return result


# --------------------------------------------------------------------------------------------
# Aggregation and outputs


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_.=" else "_" for ch in name)


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def _per_class_mean(pairs: list[tuple[str, bool]]) -> float | None:
    """Mean over classes of the per-class accuracy (the paper's "mean per-class")."""
    if not pairs:
        return None
    by: dict[str, list[bool]] = {}
    for cls, ok in pairs:
        by.setdefault(cls, []).append(ok)
    return float(np.mean([np.mean(v) for v in by.values()]))


RESULT_COLUMNS = ["preset", "group", "concept", "role", "x", "configurations", "n_clips", "embedding", "n_ref",
                  "fd", "mmd2", "mmd_bandwidth", "clap", "check", "check_acc", "check_n", "probe_acc",
                  "probe_p_target", "probe_layer", "probe_n", "note"]
CLIP_COLUMNS = ["preset", "config", "sample", "prompt", "seed", "concept", "class", "coefficient", "role", "window",
                "check_pred", "check_correct", "probe_pred", "probe_correct", "probe_p_target", "clap",
                "tokens_sha256", "note"]


def aggregate(settings: SweepSettings, configs: Sequence[Configuration], records: dict[str, dict],
              probes: dict[str, FittedProbe], probe_missing: dict[str, str]) -> SweepResult:
    """Results per (group, concept, role) from the stored records, then every output file."""
    from .metrics import RBFKernel, frechet_distance, mmd2_unbiased

    out = Path(settings.out)
    order = {REFERENCE: -1, **{c.name: i for i, c in enumerate(configs)}}
    recs = sorted((r for r in records.values() if r["config"] in order and r["sample"] < settings.samples),
                  key=lambda r: (order[r["config"]], r["sample"]))
    random_weights = any(r["random_weights"] for r in recs)
    note = NOISE_LABEL if random_weights else ""
    ref = [r for r in recs if r["config"] == REFERENCE]
    ref_emb = np.array([r["embedding"] for r in ref]) if ref else None
    kernel = RBFKernel.from_reference(ref_emb) if ref_emb is not None and len(ref_emb) >= 2 else None
    embedder = settings.embedder_name

    groups: dict[tuple[str, str, str], dict] = {}
    for r in recs:
        for t in r["targets"]:
            key = (t["group"], t["concept"], t["role"])
            g = groups.setdefault(key, {"x": t["x"], "configs": [], "records": {}, "targets": []})
            if r["config"] not in g["configs"]:
                g["configs"].append(r["config"])
            g["records"][r["unit"]] = r
            g["targets"].append(t)
    keys = list(groups)
    if settings.preset == "pairs":  # Table 5's layout: by attribute, then eta0
        concept_order = {c: i for i, c in enumerate(dict.fromkeys(k[1] for k in keys))}
        keys.sort(key=lambda k: (k[0] != REFERENCE_GROUP, concept_order[k[1]], _num(groups[k]["x"])))
    rows = []
    for key in keys:
        (group, concept, role), g = key, groups[key]
        clips = list(g["records"].values())
        emb = np.array([r["embedding"] for r in clips])
        fd = mmd = None
        if group != REFERENCE_GROUP and kernel is not None and len(emb) >= 2:
            fd = frechet_distance(ref_emb, emb)
            mmd = mmd2_unbiased(ref_emb, emb, kernel)
        claps = [r["clap"] for r in clips if r["clap"] is not None]
        checks = [(t["class"], t["check"]["correct"]) for t in g["targets"] if t["check"] is not None]
        probed = [t for t in g["targets"] if t["probe"] is not None]
        probe = probes.get(concept)
        rows.append({
            "preset": settings.preset, "group": group, "concept": concept, "role": role, "x": g["x"],
            "configurations": ";".join(g["configs"]), "n_clips": len(clips), "embedding": embedder,
            "n_ref": len(ref), "fd": fd, "mmd2": mmd, "mmd_bandwidth": kernel.bandwidth if kernel else None,
            "clap": float(np.mean(claps)) if claps else "unavailable",
            "check": check_name(concept) or "none", "check_acc": _per_class_mean(checks), "check_n": len(checks),
            "probe_acc": (_per_class_mean([(t["class"], t["probe"]["correct"]) for t in probed]) if probed
                          else probe_missing.get(concept, "unavailable")),
            "probe_p_target": float(np.mean([t["probe"]["p_target"] for t in probed])) if probed else None,
            "probe_layer": probe.layer if probe is not None else None, "probe_n": len(probed), "note": note,
        })
    clip_rows = []
    for r in recs:
        for t in r["targets"]:
            c, p = t["check"], t["probe"]
            clip_rows.append({
                "preset": settings.preset, "config": r["config"], "sample": r["sample"], "prompt": r["prompt"],
                "seed": r["seed"], "concept": t["concept"], "class": t["class"], "coefficient": t["coefficient"],
                "role": t["role"], "window": "-".join(_fmt(float(w)) for w in t["window"]),
                "check_pred": c["pred"] if c else "", "check_correct": c["correct"] if c else None,
                "probe_pred": p["pred"] if p else "", "probe_correct": p["correct"] if p else None,
                "probe_p_target": p["p_target"] if p else None, "clap": r["clap"] if r["clap"] is not None else "unavailable",
                "tokens_sha256": r["tokens_sha256"], "note": note})
    traces = _mean_traces(recs)
    files = {"results": out / "results.csv", "clips": out / "clips.csv", "summary": out / "summary.md"}
    _write_csv(files["results"], RESULT_COLUMNS, rows)
    _write_csv(files["clips"], CLIP_COLUMNS, clip_rows)
    if traces:
        files["traces"] = out / "traces.csv"
        _write_csv(files["traces"], ["preset", "config", "source", "series", "t", "mean", "n", "note"],
                   [{"preset": settings.preset, "note": note, **row} for row in traces])
    plot = _plot_metrics(out / "metrics.png", settings, rows, note)
    if plot:
        files["metrics_png"] = plot
    if traces:
        tplot = _plot_traces(out / "traces.png", settings, traces, note, probes)
        if tplot:
            files["traces_png"] = tplot
    _write_summary(files["summary"], settings, configs, rows, probes, probe_missing, note, files,
                   done=len(recs), total=settings.samples * (len(configs) + 1),
                   dim=len(recs[0]["embedding"]) if recs else None)
    return SweepResult(out, rows, clip_rows, files, 0, 0, random_weights)


def _write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(columns)
        for row in rows:
            w.writerow([_fmt(row.get(c)) for c in columns])
    os.replace(tmp, path)


def _mean_traces(recs: list[dict]) -> list[dict]:
    """Mean trace over samples per (configuration, source, series) at each window time."""
    acc: dict[tuple[str, str, str], dict[float, list[float]]] = {}
    for r in recs:
        tr = r.get("trace")
        if not tr:
            continue
        for source in ("probe", "check"):
            for series, values in tr[source].items():
                slot = acc.setdefault((r["config"], source, series), {})
                for t, v in zip(tr["t"], values):
                    slot.setdefault(t, []).append(v)
    rows = []
    for (config, source, series), by_t in acc.items():
        for t in sorted(by_t):
            rows.append({"config": config, "source": source, "series": series, "t": t,
                         "mean": float(np.mean(by_t[t])), "n": len(by_t[t])})
    return rows


def _matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except ImportError:  # plots are a convenience; the CSVs hold the same numbers
        return None


def _num(v) -> float:
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None else float("nan")


def _plot_metrics(path: Path, settings: SweepSettings, rows: list[dict], note: str) -> Path | None:
    """FD, MMD², CLAP and accuracy per group: against eta0 (the paper's Fig. 2) or K or p where the preset
    has a numeric axis, else one point per configuration."""
    plt = _matplotlib()
    if plt is None:
        return None
    steered = [r for r in rows if r["group"] != REFERENCE_GROUP]
    numeric = all(r["x"] is not None for r in steered)
    xlabel = {"eta": "control coefficient eta0 (|eta0| for tempos)", "pairs": "eta0 of the attribute",
              "topk": "K (layers steered)", "gate": "gate probability p"}.get(settings.preset, "configuration")
    labels = list(dict.fromkeys(r["group"] for r in steered))
    use_probe = any(isinstance(r["probe_acc"], float) for r in steered)
    panels = [("fd", f"FD ({settings.embedder_name}) lower = closer"), ("mmd2", "MMD² (unbiased) lower = closer"),
              ("clap", "CLAP score vs prompt"),
              ("probe_acc" if use_probe else "check_acc",
               "probe accuracy (mean per class)" if use_probe else "independent check accuracy (mean per class)")]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), dpi=110)
    for ax, (key, title) in zip(axes.flat, panels):
        series: dict[str, list[tuple[float, float]]] = {}
        for r in steered:
            name = r["concept"] + (f" ({r['role']})" if r["role"] else "")
            x = r["x"] if numeric else labels.index(r["group"])
            series.setdefault(name, []).append((x, _num(r[key])))
        for name, pts in list(series.items()):
            if all(math.isnan(p[1]) for p in pts):
                del series[name]
                continue
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ref_rows = [r for r in rows if r["group"] == REFERENCE_GROUP]
        if key in ("clap", "check_acc", "probe_acc"):
            for r in ref_rows:
                if isinstance(r[key], float):
                    ax.axhline(r[key], ls="--", lw=1, color="grey")
        if key == "clap" and not any(isinstance(r["clap"], float) for r in steered):
            ax.text(0.5, 0.5, "CLAP unavailable:\nno CLAP weights supplied", ha="center", va="center",
                    transform=ax.transAxes)
        ax.set_title(title, fontsize=9)
        if not numeric:
            ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
        else:
            ax.set_xlabel(xlabel, fontsize=8)
        ax.grid(alpha=0.3)
        if series:
            ax.legend(fontsize=7)
    fig.suptitle(f"musicrfm sweep {settings.preset}: {PAPER[settings.preset]}; {settings.model}, "
                 f"{settings.samples} samples x {settings.seconds:g} s" + (f"\n[{note}]" if note else "")
                 + "\n(dashed: unsteered reference)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _plot_traces(path: Path, settings: SweepSettings, traces: list[dict], note: str,
                 probes: dict[str, FittedProbe]) -> Path | None:
    """Fig. 1: the probe softmax of the target class over time per schedule (a), or of n1 and n2 for the
    crossfade (b); beside it the independent check's pitch-class share (notes)."""
    plt = _matplotlib()
    if plt is None:
        return None
    sources = [s for s in ("probe", "check") if any(t["source"] == s for t in traces)]
    fig, axes = plt.subplots(1, len(sources), figsize=(6 * len(sources), 4), dpi=110, squeeze=False)
    for ax, source in zip(axes[0], sources):
        lines: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for t in traces:
            if t["source"] == source:
                lines.setdefault((t["config"], t["series"]), []).append((t["t"], t["mean"]))
        for (config, series), pts in lines.items():
            style = {"ls": "--", "color": "grey"} if config == REFERENCE else {}
            label = config if series == "target" else f"{config}: {series}"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, **style)
        if source == "probe":
            layers = ", ".join(f"{c} layer {p.layer}" for c, p in probes.items())
            ax.set_title(f"probe softmax of the steered class ({layers})", fontsize=9)
            ax.set_ylabel("probability")
        else:
            ax.set_title("independent check: pitch-class share of the steered class", fontsize=9)
            ax.set_ylabel("share of the pitch-class profile")
        ax.set_xlabel(f"time (s), {settings.window:g} s windows every {settings.hop:g} s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"musicrfm sweep {settings.preset}: {PAPER[settings.preset]}; mean of {settings.samples} samples"
                 + (f" [{note}]" if note else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _md(value) -> str:
    if value is None or value == "":
        return "–"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _write_summary(path: Path, settings: SweepSettings, configs: Sequence[Configuration], rows: list[dict],
                   probes: dict[str, FittedProbe], probe_missing: dict[str, str], note: str,
                   files: dict[str, Path], done: int, total: int, dim: int | None) -> None:
    lines = [f"# Sweep `{settings.preset}`: {PAPER[settings.preset]}", ""]
    if note:
        lines += [(f"**{note}.** The model ({settings.model}) has random weights: every clip is noise, and these "
                   "numbers test the pipeline, not steering."), ""]
    clap = f"CLAP score vs the prompt with `{settings.clap}`" if settings.clap else \
        "CLAP score: unavailable (no CLAP weights supplied; never estimated from another embedding)"
    lines += [
        (f"- model `{settings.model}`; banks {', '.join(f'`{Path(b).name}`' for b in settings.banks)}; "
         f"concepts {', '.join(settings.concepts)}"),
        f"- {settings.samples} samples per configuration x {settings.seconds:g} s; prompts cycled: "
        + "; ".join(f"\"{p}\"" for p in settings.prompts) + f"; seed {settings.seed}",
        f"- units stored: {done} of {total}",
        f"- FD and unbiased MMD² against the unsteered reference (same prompts and seeds), embedding "
        f"**{settings.embedder_name}**, RBF bandwidth frozen from the reference (median heuristic)"
        + ("; this embedding is not CLAP: values are comparable only within this embedding" if not settings.clap else ""),
        f"- {clap}",
    ]
    for c, p in probes.items():
        lines.append(f"- probe accuracy ({c}): {p.describe()}; features re-extracted from the generated audio")
    for c, reason in probe_missing.items():
        lines.append(f"- probe accuracy ({c}): {reason}")
    lines.append("- independent checks: " + "; ".join(f"{c}: {n}" for c, n in CHECKS.items())
                 + "; other concepts have none")
    if dim is not None and settings.samples <= dim:
        lines.append(f"- FD with n = {settings.samples} clips per set in d = {dim} dimensions: the covariance is "
                     f"singular for n <= d and FD is then mostly bias; compare rows at equal n only")
    lines += ["", "| group | concept | role | n | FD | MMD² | CLAP | check acc | probe acc | note |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append("| " + " | ".join(_md(r[k]) for k in ("group", "concept", "role", "n_clips", "fd", "mmd2", "clap",
                                                           "check_acc", "probe_acc", "note")) + " |")
    lines += ["", "Configurations:", ""]
    lines += [f"- `{c.name}`: {c.describe()}" for c in configs]
    lines += ["", "Files: " + ", ".join(f"`{p.name}`" for p in files.values() if p != path) + ", `units.jsonl` "
              "(one record per finished clip), `sweep.json` (the settings)."]
    path.write_text("\n".join(lines) + "\n")

