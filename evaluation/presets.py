"""The paper's steering evaluations as data: presets, the sweep's settings, and how a preset expands into units.

A preset is a name -> a list of named configurations, each a SteeringSpec template (controls with a
coefficient, schedule, layer weighting, gate) whose target classes are filled in per sample.

  eta        single direction over eta0 in {0.15, 0.30, 0.45, 0.60}, p = 0.3, exponential kappa 0.95 (Table 2, Fig. 2)
  pairs      every pair of concepts, eta0 in {0.3, 0.6}^2, grouped by attribute (Table 5)
  schedules  linear rise / decay, exponential decay, logistic rise, sine (Table 6, Fig. 1a)
  crossfade  n1 -> n2 over the whole clip, eta0 0.45 (Sec. 6.2, Fig. 1b)
  layers     linear, exponential kappa 0.98 / 0.95 / 0.92, uniform; p = 1 (Table 8)
  topk       top-K layers, K in {4, 8, 12, 16, 24, 32, 48} scaled to the model's depth; p = 1 (Table 9)
  gate       p in {0.15, 0.30, 0.45, 0.6, 0.75, 0.9, 1.0}, uniform layers (Table 10)
  methods    MusicRFM (residual bank, exponential weighting, add rule) against linear-probe activation steering
             (attention bank, its clustering-chosen layer alone, norm-preserving rule) at matched strength m
             (`method_configurations`; two banks of the concept, one per injection point)
  chord-quality  (not the paper's) every root x every chord quality: the root steered with the notes bank at
             a moderate strength, the quality with the chords bank at each level, gates 1.0 and 0.3, beside
             the same roots steered alone, the root + a quality control (`quality:<q>`, engine.steering:
             the quality's chord tones on the root read from the hidden state, written with the notes bank) at
             each level, and the triad's three notes steered with the notes bank (the positive control);
             judged relative to the steered root (evaluation.chord_quality)

The unit of work is one (configuration, sample): sample i has its own prompt (prompts[i % len]), seed
(derived from the sweep seed and i only, so it does not matter which worker runs it) and target classes;
the unsteered reference set is the configuration "reference" with the same prompts and seeds.
`evaluation.run` generates and measures the units; `evaluation.report` aggregates them.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from musicrfm.engine.generation import file_sha256
from musicrfm.engine.sampling import SamplingConfig
from musicrfm.engine.steering import QUALITY_CONCEPT, UNITS, DirectionControl, LayerWeighting, Schedule, SteeringSpec
from musicrfm.probes.syntheory import PITCH_NAMES
from musicrfm.probes.train import REGRESSION_CONCEPTS

from .audio_checks import CHORD_TEMPLATES
from .embedding import LOGMEL_STATS, check_logmel_name

__all__ = [
    "PRESETS",
    "PAPER",
    "PAPER_STEPS",
    "PAPER_FRAME_RATE",
    "REFERENCE",
    "REFERENCE_GROUP",
    "ControlTemplate",
    "Configuration",
    "SweepSettings",
    "Unit",
    "MethodBanks",
    "build_configurations",
    "method_banks",
    "method_configurations",
    "derive_seed",
    "plan_units",
    "scaled_schedules",
    "topk_values",
]

FORMAT = "musicrfm.sweep"
# 2: clips are generated in batches on the batched engine (rows padded to engine.loop.MIN_ROWS), whose numbers
# differ in the last bits from version 1's one-clip decoder: a version-1 sweep is not resumed with version-2 clips.
VERSION = 2
PRESETS = ("eta", "pairs", "schedules", "crossfade", "layers", "topk", "gate", "methods", "chord-quality")
PAPER = {
    "eta": "Table 2 and Fig. 2 (single direction over eta0)",
    "pairs": "Table 5 (pairwise multi-direction, grouped by attribute)",
    "schedules": "Table 6 and Fig. 1a (time schedules)",
    "crossfade": "Sec. 6.2 and Fig. 1b (two-class crossfade)",
    "layers": "Table 8 (layer weighting)",
    "topk": "Table 9 (top-K layer selection)",
    "gate": "Table 10 (gate probability p)",
    "methods": "MusicRFM vs linear-probe activation steering (attention site, chosen layer, norm-preserving) "
               "at matched strength",
    "chord-quality": "issue 14 (chord quality across the 12 roots; not a table of the paper)",
}
REFERENCE = "reference"  # the unsteered configuration
REFERENCE_GROUP = "reference (unsteered)"
DEFAULT_PROMPTS = ("lofi hip hop beat with warm piano", "slow dreamy ambient synth pad",
                   "acoustic guitar folk song", "upbeat jazz trio with double bass")
# App. E defines the schedules over 1500 steps (30 s): the clock of the paper's protocols is MusicGen's
# 50 steps per second. Presets are planned on it before any model is loaded (a Ray driver never loads one);
# the model that runs the units must share it (evaluation.run checks its `frame_rate`).
PAPER_STEPS = 1500
PAPER_SECONDS = 30.0
PAPER_FRAME_RATE = PAPER_STEPS / PAPER_SECONDS

# The paper's settings. "Optimal" (Sec. 5.1): gate p = 0.3, exponential layer weighting w0 = 1, kappa = 0.95.
OPTIMAL_GATE = 0.3
OPTIMAL_LAYERS = LayerWeighting("exponential", kappa=0.95, w0=1.0)
# The ablations (App. C) share one "naive" row in Tables 8, 9 and 10 (uniform layers, K = 48, p = 1.0, all
# with FD 0.599): each varies one knob from uniform weighting with the gate always open.
NAIVE_LAYERS = LayerWeighting("all", w0=1.0)
ETA_LEVELS = (0.15, 0.30, 0.45, 0.60)
PAIR_LEVELS = (0.3, 0.6)
DEFAULT_ETA0 = 0.45  # schedules / crossfade (Sec. 6.2's value); the ablations do not state theirs
# The levels in relative units (engine.steering: a fraction of each layer's typical norm), the default: the
# paper's raw values are for MusicGen-large's scale and do nothing on smaller models. Chosen from the
# closed-loop measurement on musicgen-mini (docs/musicgen-mini.md): 0.1 barely moves the pitch class, 0.5 is
# an audible but musical pull, 1.0 the page's full knob (>= 0.8 accuracy).
RELATIVE_LEVELS = {"eta": (0.1, 0.25, 0.5, 1.0), "pairs": (0.25, 0.5), "single": 0.5}
PAPER_LEVELS = {"eta": ETA_LEVELS, "pairs": PAIR_LEVELS, "single": DEFAULT_ETA0}
TOPK_PAPER = (4, 8, 12, 16, 24, 32, 48)  # of 48 layers
GATE_LEVELS = (0.15, 0.30, 0.45, 0.6, 0.75, 0.9, 1.0)
# The methods preset's matched strengths m: the push along the direction per step, summed over the steered
# layers, each as a fraction of that layer's norm (method_configurations). m < 1: the norm-preserving rule's
# push alpha/(1+alpha) never reaches a whole layer norm.
MATCHED_LEVELS = (0.25, 0.5, 0.75)
# chord-quality: the quality levels (relative; raw: the paper's 0.45 and 0.6), the root's strength (the notes
# bank at half a layer's size: 0.73 pitch-class accuracy at p = 0.3 on musicgen-mini) and the gates it is
# measured at (always open, and the paper's 0.3).
CHORD_QUALITY_LEVELS = {"relative": (0.5, 1.0), "raw": (0.45, 0.6)}
CHORD_ROOT_STRENGTH = {"relative": 0.5, "raw": 0.45}
CHORD_QUALITY_GATES = (1.0, 0.3)


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
    stride: int = 1  # "cycle" picks classes[(i // stride) % C]: a stride of the other concept's C crosses the two
    # pick "tone": the notes class of chord tone `tone` (0 root, 1 third, 2 fifth) of quality qualities[i % Q] on
    # root (i // Q) % 12: a triad built from note directions, the chord-quality preset's positive control
    tone: int = 0
    qualities: tuple[str, ...] = ()


@dataclass(frozen=True)
class Configuration:
    name: str
    controls: tuple[ControlTemplate, ...]
    gate_p: float = OPTIMAL_GATE
    layers: LayerWeighting = OPTIMAL_LAYERS
    trace: bool = False  # probe / check traces over time (schedules, crossfade)
    site: str = "residual"  # injection point (its bank is the concept's bank read there)
    rule: str = "add"  # update rule (engine.steering.RULES)
    units: str | None = None  # strength units of this configuration (None: the sweep's --units)

    def describe(self) -> str:
        parts = [f"{c.concept}{'(' + c.role + ')' if c.role else ''}={c.coefficient:g}"
                 + ("" if c.schedule.kind == "constant" else f"@{c.schedule.kind}") for c in self.controls]
        extra = "".join(f", {name} {value}" for name, value, default in
                        (("site", self.site, "residual"), ("rule", self.rule, "add"), ("units", self.units, None))
                        if value != default)
        return f"{' + '.join(parts)}, gate p={self.gate_p:g}, layers {self.layers}{extra}"


@dataclass(frozen=True)
class MethodBanks:
    """What the methods preset needs of a concept's two banks: the MusicRFM (residual) bank's layer-weight sum
    under its weighting (mean over classes) and the linear (attention) bank's chosen layer."""

    concept: str
    weight_sum: float  # mean over classes of sum_l w_l (MusicRFM's weighting, relative units)
    chosen_layer: int
    num_layers: int
    linear_weight_sum: float = 0.0  # the same for the attention bank's scores (the crossed configurations)


def method_banks(bank_paths: Sequence[str], concepts: Sequence[str],
                 layers: LayerWeighting = OPTIMAL_LAYERS) -> dict[str, MethodBanks]:
    """Each concept's MusicRFM bank (read at the residual stream) and linear-probe bank (read at the attention
    output, with a chosen layer), from the sweep's banks. A clear error when either is missing."""
    from musicrfm.engine.bank import DirectionBank

    by_site: dict[tuple[str, str], DirectionBank] = {}
    for path in bank_paths:
        bank = DirectionBank.load(path)
        for concept in bank.concepts:
            by_site[(concept, bank.injection_point)] = bank
    out = {}
    for c in concepts:
        missing = [site for site in ("residual", "attention") if (c, site) not in by_site]
        if missing:
            raise ValueError(f"the methods preset compares two banks of {c!r}: a residual-stream bank (MusicRFM) and "
                             f"an attention-output bank (`musicrfm extract --site attention`, `musicrfm train "
                             f"--method linear --layer-choice clustering`); no {' or '.join(missing)} bank of {c!r} "
                             "among --bank")
        rfm, linear = by_site[(c, "residual")], by_site[(c, "attention")]
        sums = [[float(layers.weights(bank[f"{c}:{k}"].scores).sum()) for k in bank.concepts[c]]
                for bank in (rfm, linear)]
        out[c] = MethodBanks(c, sum(sums[0]) / len(sums[0]), linear.chosen_layer, linear.fingerprint.num_layers,
                             sum(sums[1]) / len(sums[1]))
    return out


def method_configurations(info: MethodBanks, levels: Sequence[float], layers: LayerWeighting = OPTIMAL_LAYERS,
                          crossed: bool = True) -> list[Configuration]:
    """The two methods on one concept at each matched strength m.

    Matched means the same push along the concept direction per step, summed over the steered layers, each as a
    fraction of that layer's norm: MusicRFM's add rule at relative strength s adds s x w_l x n_l at layer l
    (n_l the layer's typical norm), a push of s x sum_l w_l, so s = m / sum_l w_l; the norm-preserving rule
    (h + alpha |h| r) / (1 + alpha) at one layer adds alpha / (1 + alpha) of the token's own norm along r (and
    shrinks h by 1 / (1 + alpha)), so alpha = m / (1 - m), a raw (dimensionless) coefficient. The gate is open
    on every step for both (p = 1), so "per step" holds step by step.

    With `crossed` two more configurations per m say which half of the recipe matters: the linear-probe bank
    steered MusicRFM's way (attention site, every layer weighted, add rule, s = m / its own sum_l w_l) and the
    MusicRFM bank steered the linear-probe way (residual site, the chosen layer alone, norm-preserving)."""
    configs = []
    single = LayerWeighting.single(info.chosen_layer, info.num_layers)
    for m in levels:
        if not 0 < m < 1:
            raise ValueError(f"the methods preset's matched strength m must be in (0, 1), got {m}")
        c = info.concept
        alpha = m / (1.0 - m)
        configs.append(Configuration(f"{c} musicrfm m={m:.2f}", (ControlTemplate(c, m / info.weight_sum, x=m),),
                                     gate_p=1.0, layers=layers, units="relative"))
        configs.append(Configuration(f"{c} linear-probe m={m:.2f}", (ControlTemplate(c, alpha, x=m),), gate_p=1.0,
                                     layers=single, site="attention", rule="norm", units="raw"))
        if crossed:
            configs.append(Configuration(
                f"{c} crossed: linear bank, musicrfm steering m={m:.2f}",
                (ControlTemplate(c, m / info.linear_weight_sum, x=m),), gate_p=1.0, layers=layers, site="attention",
                units="relative"))
            configs.append(Configuration(
                f"{c} crossed: rfm bank, linear-probe steering m={m:.2f}", (ControlTemplate(c, alpha, x=m),),
                gate_p=1.0, layers=single, rule="norm", units="raw"))
    return configs


def default_levels(units: str) -> dict:
    """A preset's strength levels when --eta0 is not given: the paper's in raw units, ours in relative ones."""
    if units not in UNITS:
        raise ValueError(f"units must be one of {', '.join(UNITS)}, got {units!r}")
    return PAPER_LEVELS if units == "raw" else RELATIVE_LEVELS


def _eta_list(eta0: Sequence[float] | None, default: Sequence[float]) -> tuple[float, ...]:
    return tuple(float(e) for e in (eta0 if eta0 else default))


def _single_eta(preset: str, eta0: Sequence[float] | None, default: float) -> float:
    if eta0 and len(eta0) > 1:
        raise ValueError(f"preset {preset!r} takes one --eta0 value, got {list(eta0)}")
    return float(eta0[0]) if eta0 else default


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


def _chord_quality_configurations(concepts: Sequence[str], classes: dict[str, list[str]],
                                  eta0: Sequence[float] | None, units: str) -> list[Configuration]:
    """Sample i steers root (i // Q) % 12 (notes bank) and quality i % Q (chords bank), so every root meets every
    quality every 12 x Q samples. Per gate: the root alone (the quality control at strength 0, so the clip is
    judged against the quality it would have been steered to), root + quality at each level, root + the quality
    control that reads the root (`quality:<q>`, when the chords bank's classes are qualities it knows) at each
    level, and the triad built from the notes bank (root, third and fifth of the quality, each at the root's
    strength). Rows other than root + chords carry the chords control at 0: it names the quality judged."""
    if list(concepts) != ["chords"]:
        raise ValueError(f"the chord-quality preset steers --concept chords (got {', '.join(concepts)})")
    if "notes" not in classes:
        raise ValueError("the chord-quality preset steers the root with a notes bank: add --bank with the notes "
                         "directions (the bundled model's are used when no --bank is given)")
    qualities = len(classes["chords"])
    root = ControlTemplate("notes", CHORD_ROOT_STRENGTH[units], role="root", stride=qualities)
    triad = tuple(ControlTemplate("notes", CHORD_ROOT_STRENGTH[units], pick="tone", role=role, tone=k,
                                  qualities=tuple(classes["chords"]))
                  for k, role in enumerate(("root", "third", "fifth")))
    configs = []
    for gate in CHORD_QUALITY_GATES:
        configs.append(Configuration(f"root only p={gate:g}", (
            root, ControlTemplate("chords", 0.0, role="quality", group=f"root only p={gate:g}", x=0.0)),
            gate_p=gate))
        for eta in _eta_list(eta0, CHORD_QUALITY_LEVELS[units]):
            configs.append(Configuration(f"root + chords eta0={eta:g} p={gate:g}", (
                root, ControlTemplate("chords", eta, role="quality", x=eta)), gate_p=gate))
        if classes.get(QUALITY_CONCEPT) == classes["chords"]:
            for eta in _eta_list(eta0, CHORD_QUALITY_LEVELS[units]):
                name = f"root + quality (read root) eta0={eta:g} p={gate:g}"
                configs.append(Configuration(name, (
                    root, ControlTemplate(QUALITY_CONCEPT, eta, role="read root", x=eta),
                    ControlTemplate("chords", 0.0, role="quality", group=name, x=eta)), gate_p=gate))
        configs.append(Configuration(f"triad from notes p={gate:g}", triad + (
            ControlTemplate("chords", 0.0, role="quality", group=f"triad from notes p={gate:g}", x=0.0),),
            gate_p=gate))
    return configs


def build_configurations(preset: str, concepts: Sequence[str], classes: dict[str, list[str]], num_layers: int,
                         seconds: float, eta0: Sequence[float] | None = None,
                         units: str = "relative", methods: dict[str, MethodBanks] | None = None) -> list[Configuration]:
    """The configurations of a preset (the reference is not among them). `classes`: concept -> class names
    from the bank; `num_layers` scales top-K; `seconds` scales schedules and the crossfade; `units` picks the
    default strength levels (`default_levels`); `methods`: the methods preset's banks (`method_banks`)."""
    levels = default_levels(units)
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    concepts = list(dict.fromkeys(concepts))
    if not concepts:
        raise ValueError("name at least one concept (--concept notes)")
    for c in concepts:
        if c not in classes:
            raise ValueError(f"concept {c!r} is not in the bank(s) (they hold: {', '.join(classes) or 'nothing'})")
    steps = max(1, round(seconds * PAPER_FRAME_RATE))
    configs: list[Configuration] = []
    if preset == "eta":
        for c in concepts:
            for eta in _eta_list(eta0, levels["eta"]):
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
        levels = _eta_list(eta0, levels["pairs"])
        for a, b in itertools.combinations(usable, 2):
            for ea, eb in itertools.product(levels, levels):
                configs.append(Configuration(f"{a}+{b} eta0={ea:.2f}/{eb:.2f}", (
                    ControlTemplate(a, ea, pick="cycle", group=f"{a} eta0={ea:.2f}", x=ea),
                    ControlTemplate(b, eb, pick="random", group=f"{b} eta0={eb:.2f}", x=eb))))
    elif preset == "schedules":
        eta = _single_eta(preset, eta0, levels["single"])
        for c in concepts:
            for label, schedule in scaled_schedules(steps):
                configs.append(Configuration(f"{c} {label}", (ControlTemplate(c, eta, schedule),), trace=True))
    elif preset == "crossfade":
        eta = _single_eta(preset, eta0, levels["single"])
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
        eta = _single_eta(preset, eta0, levels["single"])
        schemes = [("linear", LayerWeighting("linear", w0=1.0)),
                   ("exponential kappa=0.98", LayerWeighting("exponential", kappa=0.98, w0=1.0)),
                   ("exponential kappa=0.95", LayerWeighting("exponential", kappa=0.95, w0=1.0)),
                   ("exponential kappa=0.92", LayerWeighting("exponential", kappa=0.92, w0=1.0)),
                   ("uniform (naive)", NAIVE_LAYERS)]
        for c in concepts:
            for label, weighting in schemes:
                configs.append(Configuration(f"{c} {label}", (ControlTemplate(c, eta),), gate_p=1.0, layers=weighting))
    elif preset == "methods":
        for c in concepts:
            if c in REGRESSION_CONCEPTS:
                raise ValueError(f"the methods preset compares classification steering; {c!r} is a regression concept")
            if methods is None or c not in methods:
                raise ValueError(f"the methods preset needs the banks of {c!r} (method_banks)")
            configs += method_configurations(methods[c], _eta_list(eta0, MATCHED_LEVELS))
    elif preset == "topk":
        eta = _single_eta(preset, eta0, levels["single"])
        for c in concepts:
            for k in topk_values(num_layers):
                configs.append(Configuration(f"{c} K={k}", (ControlTemplate(c, eta, x=float(k)),), gate_p=1.0,
                                             layers=LayerWeighting("topk", k=k, w0=1.0)))
    elif preset == "chord-quality":
        configs = _chord_quality_configurations(concepts, classes, eta0, units)
    else:  # gate
        eta = _single_eta(preset, eta0, levels["single"])
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
    eta0: tuple[float, ...] | None = None  # None: the preset's own levels (in `units`)
    units: str = "relative"  # strength units (engine.steering.UNITS); "raw" reproduces the paper's tables
    layers: str | None = None  # replaces the paper's optimal layer weighting where a preset uses it (eta, pairs, ...)
    device: str | None = None
    dtype: str | None = None
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    features: str | None = None  # root of `musicrfm extract` output (<root>/<concept>/)
    clap: str | None = None  # CLAP weights (HF id in the local cache, or a directory)
    embedder: str = LOGMEL_STATS  # without CLAP: the log-mel embedding (evaluation.embedding.LOGMEL_EMBEDDERS)
    probe_layer: int | None = None
    probe_trials: int | None = None  # None: the search's default (the paper's 100)
    probe_seed: int = 0  # the split / search seed of `musicrfm train` / `report`
    probe_device: str = "auto"  # where the probe is fitted (as `musicrfm train --device`)
    window: float = 1.0  # trace windows, seconds
    hop: float = 0.5
    chunk: int = 8  # samples per unit of work sent to a worker, generated together in one batch
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
        default_levels(self.units)  # checks the name
        check_logmel_name(self.embedder)
        if self.layers is not None:
            LayerWeighting.parse(self.layers)

    @property
    def embedder_name(self) -> str:
        return f"clap:{self.clap}" if self.clap else self.embedder

    def manifest(self) -> dict:
        """What decides the records: a rerun into the same directory must agree on all of it. (`samples`
        may grow or shrink: each sample's seed depends on its index only.)"""
        return {"format": FORMAT, "version": VERSION, "preset": self.preset, "model": self.model,
                "device": self.device or "auto", "dtype": self.dtype or "auto",
                "banks": sorted(file_sha256(b) for b in self.banks), "concepts": list(self.concepts),
                "prompts": list(self.prompts), "seconds": self.seconds, "seed": self.seed,
                "eta0": list(self.eta0) if self.eta0 else None, "units": self.units, "layers": self.layers, "sampling": self.sampling.to_dict(),
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
        return classes[(sample // template.stride) % len(classes)]
    if template.pick == "tone":
        q = len(template.qualities)
        root = classes.index(PITCH_NAMES[(sample // q) % 12])
        return classes[(root + CHORD_TEMPLATES[template.qualities[sample % q]][template.tone]) % len(classes)]
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
        strides = {}
        for t in (t for cfg in configs for t in cfg.controls):
            strides.setdefault(t.concept, t.stride)
        targets = tuple({"concept": c, "class": classes[c][(i // stride) % len(classes[c])], "coefficient": 0.0,
                         "role": "", "window": [0.0, 1.0], "group": REFERENCE_GROUP, "x": None}
                        for c, stride in strides.items())
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
            layers = cfg.layers
            if settings.layers is not None and cfg.layers == OPTIMAL_LAYERS:
                layers = LayerWeighting.parse(settings.layers)
            spec = SteeringSpec(controls=tuple(controls), gate_p=cfg.gate_p, gate_seed=seed, layers=layers,
                                units=cfg.units or settings.units, site=cfg.site, rule=cfg.rule)
            units.append(Unit(cfg.name, i, settings.prompts[i % len(settings.prompts)], seed, spec, tuple(targets),
                              cfg.trace))
    return units
