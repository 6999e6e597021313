"""Is chord quality root-invariant in a model's features? Leave-roots-out AUC of quality directions.

For each layer and method (rfm, linear, diffmeans), with and without `--invariant-to` (balanced cells, the span of
the per-root means projected out), directions are fitted on the clips of 8 roots (train/validation split as
`musicrfm train` does, by seed) and scored on the clips of the 4 held-out roots (C#, E, G, A#: every quality on
them is a pitch-class set never seen in training): AUC of x . direction for "this quality vs the rest". A
direction that encodes the quality, not one chord, keeps its AUC on unseen roots; 0.5 is chance, and below 0.5
the direction points at the seen chords' pitch classes, which unseen roots' other qualities share.

Also printed: each bank's root share, the norm of its unit direction inside the span of the per-root means (1:
all root, 0: none).

    python bench/bench_chord_invariance.py --features /work/mini-norms/features/chords --data /work/mini-norms/data \\
        --bank engine/weights/musicgen-mini/banks/chords.safetensors \\
        --bank banks/chords.rfm.invariant-root_note_name.safetensors
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch

from musicrfm.engine.bank import DirectionBank
from musicrfm.probes.extract import load_features
from musicrfm.probes.rfm import SearchConfig, roc_auc
from musicrfm.probes.train import (_fit_layer, balance_cells, nuisance_basis, nuisance_labels, remove_span,
                                   split_indices)

HELD_OUT = ("C#", "E", "G", "A#")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", type=Path, required=True, help="a chords feature directory (`musicrfm extract`)")
    ap.add_argument("--data", type=Path, required=True, help="the data set root (chords/info.csv)")
    ap.add_argument("--column", default="root_note_name")
    ap.add_argument("--trials", type=int, default=20, help="RFM search trials per fit")
    ap.add_argument("--bank", type=Path, action="append", default=[], help="banks whose root share to print")
    ap.add_argument("--out", type=Path, default=None, help="write the table as CSV here")
    args = ap.parse_args()

    fs = load_features(args.features, poolings=["mean"])
    roots = nuisance_labels(args.data, fs.concept, args.column, fs.stems)
    classes = fs.classes
    y = torch.tensor([classes.index(label) for label in fs.labels])
    seen = [i for i, r in enumerate(roots) if r not in HELD_OUT]
    unseen = torch.tensor([i for i, r in enumerate(roots) if r in HELD_OUT])
    part = split_indices([f"{fs.labels[i]}|{roots[i]}" for i in seen], seed=0)
    tr = balance_cells([seen[i] for i in part[0]], fs.labels, roots)
    va = balance_cells([seen[i] for i in part[1]], fs.labels, roots)
    positive = torch.nn.functional.one_hot(y[unseen], len(classes)).bool()
    rows = []
    for j, layer in enumerate(fs.layers):
        X = fs.features["mean"][:, j].float()
        for invariant in (False, True):
            Xp = remove_span(X, nuisance_basis(X[tr], [roots[i] for i in tr])) if invariant else X
            for method in ("rfm", "linear", "diffmeans"):
                search = SearchConfig(seed=0, trials=args.trials, device="cpu")
                D, val = _fit_layer(method, False, Xp[tr], y[tr], Xp[va], y[va], len(classes), search)
                auc = roc_auc(Xp[unseen].double() @ D.double().T, positive)
                rows.append({"layer": layer, "method": method, "invariant": invariant,
                             **{f"val_{c}": round(float(v), 3) for c, v in zip(classes, val)},
                             **{f"unseen_{c}": round(float(a), 3) for c, a in zip(classes, auc)}})
                print(rows[-1], flush=True)
    if args.out:
        with args.out.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    for path in args.bank:
        bank = DirectionBank.load(path)
        for j, layer in enumerate(fs.layers):
            B = nuisance_basis(fs.features["mean"][:, j].float(), roots)
            share = {c: round(float((B.T @ bank[f"chords:{c}"].vectors[layer].double()).norm()), 2) for c in classes}
            print(f"{path.name} layer {layer}: root share {share}")


if __name__ == "__main__":
    main()
