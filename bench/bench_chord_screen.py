"""A paired screen of chords banks on musicgen-mini: at each of the 12 roots, the same seed and caption steered
toward major and toward minor, so the third's contrast difference is paired (the chord-quality sweep preset pairs
only by sample index). Quicker than the sweep (24 clips per bank), for choosing which banks to sweep.

Each clip: the root with the notes bank at --root-strength plus `chords:<quality>` at --strength (gate 1), or, for
`triad`, the quality's three notes with the notes bank at --root-strength each; `none`: the root alone;
`quality`: the root plus the quality control `quality:<quality>` (engine.steering: the quality's tones on the root
read from the hidden state, written with the notes bank) at --strength; `alone`: the quality control with no root
steered, judged at the root of the same seed and caption's unsteered clip (the chord the model was playing).
Measured with evaluation.measure.chord_measures at the steered root.

    python bench/bench_chord_screen.py --out screen.json old=engine/weights/musicgen-mini/banks/chords.safetensors \\
        rfm-invariant=banks/chords.rfm.invariant-root_note_name.safetensors root-only=none triad=triad
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from musicrfm.engine.generation import Render, generate_many
from musicrfm.engine.model import bundled_model_dir, load_model
from musicrfm.engine.steering import DirectionControl, SteeringSpec
from musicrfm.evaluation.audio_checks import CHORD_TEMPLATES
from musicrfm.evaluation.measure import chord_measures
from musicrfm.probes.syntheory import PITCH_NAMES

PROMPTS = Path(__file__).resolve().parent.parent / "docs" / "musicgen-mini" / "chord-prompts.txt"


def _controls(bank: str, root: int, quality: str, root_strength: float, strength: float) -> list[DirectionControl]:
    if bank == "triad":
        return [DirectionControl(f"notes:{PITCH_NAMES[(root + i) % 12]}", root_strength)
                for i in CHORD_TEMPLATES[quality]]
    controls = [DirectionControl(f"notes:{PITCH_NAMES[root]}", root_strength)]
    if bank == "alone":
        return [DirectionControl(f"quality:{quality}", strength)]
    if bank == "quality":
        controls.append(DirectionControl(f"quality:{quality}", strength))
    elif bank != "none":
        controls.append(DirectionControl(f"chords:{quality}", strength))
    return controls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("banks", nargs="+", help="NAME=PATH (a chords bank), NAME=none (root only), NAME=triad or "
                                             "NAME=quality (the quality control)")
    ap.add_argument("--out", type=Path, required=True, help="per-clip measures (JSON)")
    ap.add_argument("--root-strength", type=float, default=0.5)
    ap.add_argument("--strength", type=float, default=1.0)
    ap.add_argument("--seconds", type=float, default=4.0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    banks = dict(b.split("=", 1) for b in args.banks)
    model = load_model("musicgen-mini")
    notes = str(bundled_model_dir("musicgen-mini") / "banks" / "notes.safetensors")
    prompts = [p for p in PROMPTS.read_text().splitlines() if p.strip()]
    renders, meta = [], []
    if "alone" in banks.values():  # the chord each seed and caption makes unsteered: where `alone` is judged
        renders += [Render(prompts[root % len(prompts)], 1000 + root, None, ()) for root in range(12)]
        meta += [("unsteered", root, "") for root in range(12)]
    for name, bank in banks.items():
        for root in range(12):
            for quality in ("major", "minor"):
                spec = SteeringSpec(controls=tuple(_controls(bank, root, quality, args.root_strength, args.strength)),
                                    gate_p=1.0, gate_seed=root)
                paths = (notes,) if bank in ("none", "triad", "quality", "alone") else (notes, bank)
                renders.append(Render(prompts[root % len(prompts)], 1000 + root, spec, paths))
                meta.append((name, root, quality))
    clips, own_root = [], {}
    for i in range(0, len(renders), 8):
        for gen, (name, root, quality) in zip(generate_many(model, renders[i:i + 8], args.seconds, progress=False),
                                              meta[i:i + 8]):
            if name == "unsteered":
                own_root[root] = chord_measures(gen.audio, gen.sample_rate, root)["template_root"]
                continue
            judged = own_root[root] if banks[name] == "alone" else root
            clips.append({"bank": name, "root": judged, "quality": quality,
                          **chord_measures(gen.audio, gen.sample_rate, judged)})
        print(f"{len(clips) + len(own_root)}/{len(renders)} clips", flush=True)
    args.out.write_text(json.dumps(clips))
    for name in banks:
        mine = [c for c in clips if c["bank"] == name]
        # per seed and caption (12, one per root of the protocol): the major-steered clip minus the minor-steered
        contrast = [c["third_contrast"] for c in mine]
        diff = [contrast[k] - contrast[k + 1] for k in range(0, len(mine), 2)]
        acc = {q: np.mean([c["template"] == q for c in mine if c["quality"] == q]) for q in ("major", "minor")}
        roots = np.bincount([c["template_root"] for c in mine], minlength=12)
        hit = np.mean([c["template_root"] == c["root"] for c in mine])
        print(f"| {name} | {np.mean(diff):+.3f} | {sum(d > 0 for d in diff)}/12 | {acc['major']:.2f} | "
              f"{acc['minor']:.2f} | {hit:.2f} | {int((roots > 0).sum())} | {roots.max() / len(mine):.2f} |")


if __name__ == "__main__":
    main()
