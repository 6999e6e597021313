"""FD and MMD² of a finished sweep on both offline embeddings, side by side: how much of what they measure is the
pitch-class profile (the change a notes or chords sweep aims at).

"logmel-timbre-v1" is "logmel-stats-v1" without its last 12 dimensions (tested in tests/evaluation), so the
140-dimensional embeddings a sweep stores in units.jsonl give both; the kernel bandwidth is each embedding's own
median heuristic on the reference, as the sweep's report does.

    python bench/bench_embedders.py sweeps/mini-notes/units.jsonl
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import numpy as np

from musicrfm.evaluation.metrics import RBFKernel, frechet_distance, mmd2_unbiased

TIMBRE_DIMS = 128  # logmel-timbre-v1: the 64 band means and 64 band spreads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("units", help="a sweep's units.jsonl (made with logmel-stats-v1)")
    args = ap.parse_args()
    records = [json.loads(line) for line in open(args.units) if line.strip()]
    if any(r["embedder"] != "logmel-stats-v1" for r in records):
        raise SystemExit("bench_embedders: the sweep must use logmel-stats-v1 (its embeddings hold both)")
    by_config: dict[str, list[np.ndarray]] = defaultdict(list)
    for r in records:
        by_config[r["config"]].append(np.array(r["embedding"]))
    reference = next(name for name in by_config if name.startswith("reference"))
    print("| configuration | FD stats-v1 | MMD² stats-v1 | FD timbre-v1 | MMD² timbre-v1 |\n|---|---|---|---|---|")
    for name, embeddings in sorted(by_config.items()):
        if name == reference:
            continue
        row = [name]
        for dims in (slice(None), slice(0, TIMBRE_DIMS)):
            ref, x = np.stack(by_config[reference])[:, dims], np.stack(embeddings)[:, dims]
            row += [f"{frechet_distance(ref, x):,.0f}", f"{mmd2_unbiased(ref, x, RBFKernel.from_reference(ref)):.3f}"]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
