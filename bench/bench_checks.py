"""Accuracy of the independent concept checks (evaluation/audio_checks.py) on rendered SynTheory clips.

    python bench/bench_checks.py --notes 500 --chords 400 --tempos 150 --seed 123
    python bench/bench_checks.py --notes 0 --chords 0 --tempos 0 --intervals 300 --scales 300 \
        --signatures 240 --progressions 300 --seed 123

Draws a seeded random sample of clips from the *full* SynTheory plan of each concept (all 92
programs, all octaves, all roots / inversions, all tempos and click setups), renders each with
`musicrfm.probes.syntheory.render_clip` (TimGM6mb soundfont, one process) and prints markdown tables:
pitch-class accuracy per octave, chord-quality accuracy per quality and inversion (with the
confusions), tempo accuracy (within 4 % or an octave, and within 4 % exactly) per click setup,
interval size per play style, scale mode per direction, pulses per bar (and the whole signature at
SynTheory's 120 BPM) per signature, chord progression per label (strict, and with the relative-key
twin counted), each with its chance level. Silent renders (a program that has no sample at that
pitch) are counted and left out. docs/evaluation.md records a run. Cost: ~30 ms per tonal clip to
render, ~130 ms per tempo clip; the interval, scale and progression checks take 0.1-0.2 s a clip.
"""

from __future__ import annotations

import argparse
import collections
import time

import numpy as np
import torch

from musicrfm.evaluation import audio_checks
from musicrfm.probes import syntheory as st


def sample(concept: str, count: int, seed: int) -> list[st.ClipSpec]:
    plan = st.plan_clips(concept, "full", seed=0)
    rng = np.random.default_rng([seed, st.CONCEPTS.index(concept)])
    return [plan[i] for i in sorted(rng.choice(len(plan), min(count, len(plan)), replace=False))]


def rendered(concept: str, count: int, seed: int, silent: collections.Counter):
    """(clip, audio) for the sampled clips of `concept`; silent renders are counted and left out."""
    for clip in sample(concept, count, seed):
        audio = st.render_clip(clip)
        if audio.any():
            yield clip, audio
        else:
            silent[concept] += 1


def signature_at(pulses: int, period: float, bpm: float = st.TONAL_BPM) -> str:
    """The time-signature label a (pulses per bar, pulse period) reading means at SynTheory's fixed tempo:
    a pulse of a half note -> x/2, a quarter -> x/4, an eighth -> x/8 (the nearest of the three)."""
    quarter = 60.0 / bpm
    unit = min((2, 4, 8), key=lambda u: abs(np.log2(period / (quarter * 4 / u))) if np.isfinite(period) else 0)
    return str((pulses, unit))


def table(title: str, groups: dict, extra: str = "") -> None:
    if not groups:  # the concept was not sampled (its count 0)
        return
    print(f"\n| {title} | clips | accuracy |{extra}\n|---|---|---|" + ("---|" if extra else ""))
    for key in sorted(groups, key=str):
        hits = groups[key]
        print(f"| {key} | {len(hits)} | {np.mean(hits):.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--notes", type=int, default=500)
    parser.add_argument("--chords", type=int, default=400)
    parser.add_argument("--tempos", type=int, default=150)
    parser.add_argument("--intervals", type=int, default=300)
    parser.add_argument("--scales", type=int, default=300)
    parser.add_argument("--signatures", type=int, default=240)
    parser.add_argument("--progressions", type=int, default=300)
    parser.add_argument("--seed", type=int, default=123)
    args = parser.parse_args()
    torch.set_num_threads(1)

    started = time.perf_counter()
    silent = collections.Counter()

    by_octave = collections.defaultdict(list)
    for clip, audio in rendered("notes", args.notes, args.seed, silent):
        columns = dict(clip.columns)
        predicted, _ = audio_checks.estimate_pitch_class(audio, st.SAMPLE_RATE)
        hit = predicted == columns["root_note_pitch_class"]
        octave = columns["octave"]
        low, high = st.PITCH_NAMES[0] + str(octave - 1), st.PITCH_NAMES[11] + str(octave - 1)
        by_octave[f"octave {octave} ({low}-{high})"].append(hit)
        by_octave["octaves 2-7 (C1-B6)" if 2 <= octave <= 7 else "octaves 0, 1, 8"].append(hit)
        by_octave["all"].append(hit)
    table("notes: pitch class", by_octave)

    by_kind = collections.defaultdict(list)
    confusions = collections.Counter()
    root_hits = []
    for clip, audio in rendered("chords", args.chords, args.seed, silent):
        columns = dict(clip.columns)
        quality, root, _ = audio_checks.estimate_chord_quality(audio, st.SAMPLE_RATE)
        hit = quality == columns["chord_type"]
        by_kind[f"quality {columns['chord_type']}"].append(hit)
        by_kind[f"inversion {columns['inversion']}"].append(hit)
        by_kind["all"].append(hit)
        confusions[(columns["chord_type"], quality)] += 1
        if hit:  # aug roots are ambiguous by symmetry: compare modulo 4
            modulus = 4 if quality == "aug" else 12
            root_hits.append((root - columns["root_note_pitch_class"]) % modulus == 0)
    table("chords: quality", by_kind)
    if root_hits:
        print(f"\nroot correct when the quality is: {np.mean(root_hits):.3f} of {len(root_hits)}")
    wrong = [f"{truth}->{guess} {n}" for (truth, guess), n in sorted(confusions.items()) if truth != guess]
    if by_kind:
        print("confusions (truth -> estimate): " + (", ".join(wrong) or "none"))

    by_setup = collections.defaultdict(list)
    exact = []
    for clip, audio in rendered("tempos", args.tempos, args.seed, silent):
        bpm = float(clip.label)
        estimate = audio_checks.estimate_tempo(audio, st.SAMPLE_RATE)
        hit = audio_checks.tempo_matches(estimate, bpm)
        by_setup[dict(clip.columns)["click_config_name"]].append(hit)
        by_setup["all"].append(hit)
        exact.append(abs(estimate - bpm) <= 0.04 * bpm)
    table("tempos: within 4 % or an octave", by_setup)
    if exact:
        print(f"\nwithin 4 % of the true tempo itself (no octave): {np.mean(exact):.3f} of {len(exact)}")
    theory(args, silent)
    print(f"\nsilent renders left out: {dict(silent) or 'none'}; {time.perf_counter() - started:.0f} s")


def theory(args, silent: collections.Counter) -> None:
    """Intervals, scales, time signatures and chord progressions."""
    by_style = collections.defaultdict(list)
    confusions = collections.Counter()
    for clip, audio in rendered("intervals", args.intervals, args.seed, silent):
        columns = dict(clip.columns)
        semitones, _, _ = audio_checks.estimate_interval(audio, st.SAMPLE_RATE)
        hit = semitones == columns["interval"]
        by_style[f"style {columns['play_style_name']}"].append(hit)
        by_style[f"size {columns['interval']:02d}"].append(hit)
        by_style["all"].append(hit)
        confusions[(columns["interval"], semitones)] += 1
    if by_style:
        table("intervals: size in semitones (chance 1/12)", by_style)
        wrong = [f"{t}->{g} {n}" for (t, g), n in sorted(confusions.items()) if t != g]
        print("confusions (truth -> estimate): " + (", ".join(wrong) or "none"))

    by_style, tonics = collections.defaultdict(list), []
    for clip, audio in rendered("scales", args.scales, args.seed, silent):
        columns = dict(clip.columns)
        mode, tonic, _ = audio_checks.estimate_scale(audio, st.SAMPLE_RATE)
        hit = mode == columns["mode"]
        by_style[f"mode {columns['mode']}"].append(hit)
        by_style[f"style {columns['play_style_name']}"].append(hit)
        by_style["all"].append(hit)
        tonics.append(tonic == st.PITCH_NAMES.index(columns["root_note_name"]))
    if by_style:
        table("scales: mode (chance 1/7)", by_style)
        print(f"\ntonic correct: {np.mean(tonics):.3f} of {len(tonics)}")

    by_signature, whole = collections.defaultdict(list), []
    for clip, audio in rendered("time_signatures", args.signatures, args.seed, silent):
        columns = dict(clip.columns)
        pulses, period, _ = audio_checks.estimate_meter(audio, st.SAMPLE_RATE)
        hit = pulses == columns["time_signature_beats"]
        by_signature[f"signature {clip.label}"].append(hit)
        by_signature[f"click {columns['click_config_name']}"].append(hit)
        by_signature[f"reverb {columns['reverb_level']}"].append(hit)
        by_signature["all"].append(hit)
        whole.append(signature_at(pulses, period) == clip.label)
    if by_signature:
        table("time signatures: pulses per bar (chance 1/6 over 2, 3, 4, 6, 9, 12)", by_signature)
        print(f"\nwhole signature at the known 120 BPM (chance 1/8): {np.mean(whole):.3f} of {len(whole)}")

    by_label, twins = collections.defaultdict(list), []
    for clip, audio in rendered("chord_progressions", args.progressions, args.seed, silent):
        label, _, _ = audio_checks.estimate_progression(audio, st.SAMPLE_RATE)
        by_label[clip.label].append(label == clip.label)
        by_label["all"].append(label == clip.label)
        twins.append(audio_checks.same_progression(label, clip.label))
    if by_label:
        table("chord progressions: label (chance 1/19)", by_label)
        print(f"\nthe same chords (a relative-key twin counted): {np.mean(twins):.3f} of {len(twins)}")


if __name__ == "__main__":
    main()
