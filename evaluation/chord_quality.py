"""The chord-quality preset's outputs: does steering toward a quality change the chord, at every root, without
pulling every clip onto one root?

Each clip of the preset has a root (the notes target, steered in every configuration but the unsteered
reference) and a quality (the chords target; strength 0 in the "root only" rows). Per clip the record holds
`chord` (evaluation.measure.chord_measures): the pitch-class profile, the triad-template match and the third's
contrast at the steered root (profile[root + 4] - profile[root + 3]; the reference: at the template's root).

  chord-quality.csv        per configuration and target quality: clips, template accuracy, how the template
                           read them (major / minor / aug / dim shares), mean third contrast, the template root
                           against the steered root (aug modulo 4), how spread the template roots are
  chord-quality-roots.csv  per configuration and root: mean third contrast of the clips steered toward major
                           and toward minor, and their difference (> 0: the quality control moved the third)
  chord-quality.md         one line per configuration: the major - minor contrast difference, at how many of
                           the 12 roots it is positive, template accuracy per quality, the root spread
  chord-quality.png        the major - minor difference per root, one line per configuration
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from musicrfm.probes.syntheory import PITCH_NAMES

from .audio_checks import CHORD_QUALITIES
from .presets import REFERENCE, Configuration

__all__ = ["QUALITY_COLUMNS", "ROOT_COLUMNS", "chord_quality_rows", "write_chord_quality"]

QUALITY_COLUMNS = ["config", "quality", "n", "template_acc", *(f"read_{q}" for q in CHORD_QUALITIES),
                   "third_contrast", "root_hit", "distinct_roots", "top_root", "top_root_share"]
ROOT_COLUMNS = ["config", "root", "n_major", "n_minor", "contrast_major", "contrast_minor", "difference",
                "template_acc_major", "template_acc_minor", "template_shift"]


def _clips(records: dict[str, dict]) -> list[dict]:
    """One flat row per record with a chord measure: config, root, quality and the measures."""
    rows = []
    for rec in records.values():
        chord = rec.get("chord")
        if not chord:
            continue
        by = {}
        for t in rec["targets"]:  # the first notes target is the root (the triad lists root, third, fifth)
            by.setdefault(t["concept"], t)
        if "chords" not in by:
            continue
        root = by["notes"]["class"] if "notes" in by and by["notes"]["class"] in PITCH_NAMES else None
        rows.append({"config": rec["config"], "quality": by["chords"]["class"],
                     "root": PITCH_NAMES.index(root) if root is not None else None, **chord})
    return rows


def _root_hit(row: dict) -> bool | None:
    """The template's root is the clip's (assigned) root; aug is symmetric, so modulo 4 there."""
    if row["root"] is None:
        return None
    modulus = 4 if row["template"] == "aug" else 12
    return (row["template_root"] - row["root"]) % modulus == 0


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else math.nan


def _template_shift(major: list[dict], minor: list[dict]) -> float:
    """How far the triad-template check moved between the clips steered toward major and toward minor at one root:
    (major-steered read major - minor-steered read major) + (minor-steered read minor - major-steered read minor),
    in [-2, 2]; > 0: the check heard the steer the right way, 0: it read both alike."""
    def share(group: list[dict], quality: str) -> float:
        return _mean([r["template"] == quality for r in group])
    return share(major, "major") - share(minor, "major") + share(minor, "minor") - share(major, "minor")


def chord_quality_rows(configs: Sequence[Configuration], records: dict[str, dict]) -> tuple[list[dict], list[dict]]:
    """(rows of chord-quality.csv, rows of chord-quality-roots.csv), configurations in the preset's order with
    the reference first."""
    clips = _clips(records)
    order = [REFERENCE] + [c.name for c in configs]
    quality_rows, root_rows = [], []
    for name in order:
        mine = [r for r in clips if r["config"] == name]
        if not mine:
            continue
        for quality in [q for q in CHORD_QUALITIES if any(r["quality"] == q for r in mine)]:
            group = [r for r in mine if r["quality"] == quality]
            roots = np.bincount([r["template_root"] for r in group], minlength=12)
            hits = [h for h in map(_root_hit, group) if h is not None]
            quality_rows.append({
                "config": name, "quality": quality, "n": len(group),
                "template_acc": _mean([r["template"] == quality for r in group]),
                **{f"read_{q}": _mean([r["template"] == q for r in group]) for q in CHORD_QUALITIES},
                "third_contrast": _mean([r["third_contrast"] for r in group]),
                "root_hit": _mean(hits) if hits else math.nan, "distinct_roots": int((roots > 0).sum()),
                "top_root": PITCH_NAMES[int(roots.argmax())], "top_root_share": float(roots.max() / len(group))})
        for root in range(12):
            at = {q: [r for r in mine if r["root"] == root and r["quality"] == q] for q in ("major", "minor")}
            if not (at["major"] and at["minor"]):
                continue
            cmaj = _mean([r["third_contrast"] for r in at["major"]])
            cmin = _mean([r["third_contrast"] for r in at["minor"]])
            root_rows.append({"config": name, "root": PITCH_NAMES[root], "n_major": len(at["major"]),
                              "n_minor": len(at["minor"]), "contrast_major": cmaj, "contrast_minor": cmin,
                              "difference": cmaj - cmin,
                              "template_acc_major": _mean([r["template"] == "major" for r in at["major"]]),
                              "template_acc_minor": _mean([r["template"] == "minor" for r in at["minor"]]),
                              "template_shift": _template_shift(at["major"], at["minor"])})
    return quality_rows, root_rows


def _fmt(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _write(path: Path, columns: list[str], rows: list[dict]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(columns)
        for row in rows:
            w.writerow([_fmt(row[c]) for c in columns])


def _summary(quality_rows: list[dict], root_rows: list[dict], order: list[str]) -> list[str]:
    lines = ["# chord quality across roots", "",
             "Third contrast = profile[root + 4] - profile[root + 3] at the steered root (the reference: at the "
             "template's root). `major - minor`: the mean over roots of (contrast of clips steered toward major) - "
             "(toward minor); `roots > 0`: at how many roots that difference is positive. Template accuracy: the "
             "triad-template check (evaluation.audio_checks.estimate_chord_quality) names the steered quality. "
             "Root hit: the template's root is the steered root (aug modulo 4); distinct / top share: how the "
             "template roots spread over the 12 pitch classes (all clips of the row). Template moved: at how many "
             "roots the template check read the major-steered clips as major more often, or the minor-steered as "
             "minor, than the other way round (chord-quality-roots.csv `template_shift` > 0; in brackets, < 0).", "",
             "| configuration | major - minor | roots > 0 | template moved | template acc major | minor | aug | dim | "
             "root hit | distinct roots | top root (share) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in order:
        q = {r["quality"]: r for r in quality_rows if r["config"] == name}
        if not q:
            continue
        diffs = [r["difference"] for r in root_rows if r["config"] == name]
        shifts = [r["template_shift"] for r in root_rows if r["config"] == name]
        n = sum(r["n"] for r in q.values())
        hits = [r["root_hit"] * r["n"] for r in q.values() if not math.isnan(r["root_hit"])]
        hit = sum(hits) / n if hits else math.nan
        lines.append(f"| {name} | {_fmt(_mean(diffs))} | {sum(d > 0 for d in diffs)}/{len(diffs)} | "
                     f"{sum(t > 0 for t in shifts)}/{len(shifts)} ({sum(t < 0 for t in shifts)}) | "
                     + " | ".join(_fmt(q[k]["template_acc"]) if k in q else "" for k in CHORD_QUALITIES)
                     + f" | {_fmt(hit)} | {max(r['distinct_roots'] for r in q.values())} | "
                     + ", ".join(f"{r['quality']} {r['top_root']} ({r['top_root_share']:.2f})" for r in q.values())
                     + " |")
    return lines


def _plot(path: Path, root_rows: list[dict], order: list[str]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the CSV holds the same numbers
        return None
    fig, ax = plt.subplots(figsize=(8, 4), dpi=120)
    for name in order:
        rows = [r for r in root_rows if r["config"] == name]
        if rows:
            ax.plot([PITCH_NAMES.index(r["root"]) for r in rows], [r["difference"] for r in rows], marker="o",
                    ms=3, label=name)
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xticks(range(12), PITCH_NAMES)
    ax.set_xlabel("steered root")
    ax.set_ylabel("third contrast: major-steered - minor-steered")
    ax.set_title("chord quality by root (> 0: steering moved the third the right way)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=7, framealpha=0.85)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_chord_quality(out: str | Path, configs: Sequence[Configuration], records: dict[str, dict]) -> dict[str, Path]:
    """Write the chord-quality files into `out` from a sweep's records; returns them by name."""
    out = Path(out)
    quality_rows, root_rows = chord_quality_rows(configs, records)
    order = [REFERENCE] + [c.name for c in configs]
    files = {"chord_quality": out / "chord-quality.csv", "chord_quality_roots": out / "chord-quality-roots.csv",
             "chord_quality_summary": out / "chord-quality.md"}
    _write(files["chord_quality"], QUALITY_COLUMNS, quality_rows)
    _write(files["chord_quality_roots"], ROOT_COLUMNS, root_rows)
    files["chord_quality_summary"].write_text("\n".join(_summary(quality_rows, root_rows, order)) + "\n")
    plot = _plot(out / "chord-quality.png", root_rows, order)
    if plot is not None:
        files["chord_quality_png"] = plot
    return files
