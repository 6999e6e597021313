"""Accuracy of the independent concept checks (evaluation/audio_checks.py) on rendered SynTheory clips.

    python bench/bench_checks.py --notes 500 --chords 400 --tempos 150 --seed 123

Draws a seeded random sample of clips from the *full* SynTheory plan of each concept (all 92
programs, all octaves, all roots / inversions, all tempos and click setups), renders each with
`musicrfm.probes.syntheory.render_clip` (TimGM6mb soundfont, one process) and prints markdown tables:
pitch-class accuracy per octave, chord-quality accuracy per quality and inversion (with the
confusions), tempo accuracy (within 4 % or an octave, and within 4 % exactly) per click setup.
Silent renders (a program that has no sample at that pitch) are counted and left out.
docs/evaluation.md records a run. Cost: ~30 ms per tonal clip, ~130 ms per tempo clip.
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


def table(title: str, groups: dict, extra: str = "") -> None:
    print(f"\n| {title} | clips | accuracy |{extra}\n|---|---|---|" + ("---|" if extra else ""))
    for key in sorted(groups, key=str):
        hits = groups[key]
        print(f"| {key} | {len(hits)} | {np.mean(hits):.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--notes", type=int, default=500)
    parser.add_argument("--chords", type=int, default=400)
    parser.add_argument("--tempos", type=int, default=150)
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
    print(f"\nsilent renders left out: {dict(silent) or 'none'}; {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
